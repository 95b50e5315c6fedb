"""soxs-esorex file safety: inputs never touched, outputs checked before reducing, nothing
left behind when interrupted, bad options refused in one line, esorex habits."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from astropy.io import fits

from soxs_core.simulate import DetectorSimulator
from soxs_recipes import soxs_mbias
from soxs_recipes.cli import run as esorex
from soxs_recipes.mbias import SoxsMbias

EXE = Path(sys.executable).parent
DEFAULTS = Path(__file__).resolve().parents[1] / "calib" / "static" / "defaults.yaml"
TEMP_GLOB = ".*.tmp"


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Three small X-shooter VIS and UVB biases, with their SOFs."""
    root = tmp_path_factory.mktemp("safety")
    out = {}
    for arm, tag in (("xsh_vis", "BIAS_VIS"), ("xsh_uvb", "BIAS_UVB")):
        sim = DetectorSimulator(arm=arm, binning="2x2", readout="fast", seed=3)
        paths = sim.write_bias(root / arm, n=3)
        sof = root / f"{arm}.sof"
        sof.write_text("".join(f"{p} {tag}\n" for p in paths))
        out[arm] = (sof, paths)
    return root, out


def _digest(paths):
    return {str(p): hashlib.md5(Path(p).read_bytes()).hexdigest() for p in paths}


def _fails(capsys, argv, *expect):
    """Run, expect a failure with one line on stderr holding every ``expect``."""
    status = esorex(argv)
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    for text in expect:
        assert text in err, err
    return err


def _params(product):
    h = fits.getheader(product)
    n = sum(1 for k in h if k.startswith("ESO PRO REC1 PARAM") and k.endswith("NAME"))
    return {h[f"ESO PRO REC1 PARAM{i} NAME"]: h[f"ESO PRO REC1 PARAM{i} VALUE"]
            for i in range(1, n + 1)}


# ------------------------------------------------------------------ 1. inputs never touched
def _links(tmp_path, target):
    sym, hard = tmp_path / "sym", tmp_path / "hard"
    sym.symlink_to(target)
    os.link(target, hard)
    return [Path(target), sym, hard]


def test_products_sof_never_replaces_the_input_sof(night, tmp_path, capsys):
    _, arms = night
    sof, frames = arms["xsh_vis"]
    before = _digest([sof, *frames])
    for alias in _links(tmp_path, sof):
        out = tmp_path / f"out_{alias.name}"
        err = _fails(capsys, ["--output-dir", str(out), "--products-sof", str(alias),
                              "soxs_mbias", str(sof)], str(alias), "input SOF")
        assert "products SOF" in err
        assert not list(out.glob("*.fits")) if out.is_dir() else True
    assert _digest([sof, *frames]) == before


def test_log_file_never_written_into_a_frame(night, tmp_path, capsys):
    _, arms = night
    sof, frames = arms["xsh_vis"]
    before = _digest([sof, *frames])
    for alias in _links(tmp_path, frames[1]):
        _fails(capsys, ["--output-dir", str(tmp_path / "out"), "--log-file", str(alias),
                        "soxs_mbias", str(sof)], str(alias), "input frame", "log file")
    _fails(capsys, ["--output-dir", str(tmp_path / "out"), "--log-file", str(sof),
                    "soxs_mbias", str(sof)], "input SOF")
    assert _digest([sof, *frames]) == before
    assert not (tmp_path / "out").exists()


def test_outputs_never_overwrite_config_settings_or_each_other(night, tmp_path, capsys):
    _, arms = night
    sof, frames = arms["xsh_vis"]
    rc = tmp_path / "in.rc"
    rc.write_text("soxs.soxs_mbias.stacked-clipping-sigma=4\n")
    settings = tmp_path / "in.yaml"
    settings.write_text("soxs-mbias:\n  stacked-clipping-sigma: 4\n")
    before = _digest([sof, rc, settings, *frames])
    out = tmp_path / "out"
    _fails(capsys, ["--recipe-config", str(rc), "--create-config", str(rc), "--overwrite",
                    "soxs_mbias", str(sof)], "--recipe-config file")
    _fails(capsys, ["--settings", str(settings), "--output-dir", str(out), "--products-sof",
                    str(settings), "soxs_mbias", str(sof)], "--settings file")
    _fails(capsys, ["--create-config", str(frames[0]), "--overwrite", "soxs_mbias",
                    str(sof)], "input frame")
    product = out / "master_bias_vis.fits"
    _fails(capsys, ["--output-dir", str(out), "--products-sof", str(product), "soxs_mbias",
                    str(sof)], "product of this run")
    psof = tmp_path / "p.sof"
    _fails(capsys, ["--output-dir", str(out), "--products-sof", str(psof), "--log-file",
                    str(psof), "soxs_mbias", str(sof)], "--products-sof file")
    # an input named like the product, in the output directory, is never replaced either
    (tmp_path / "here").mkdir()
    trap = tmp_path / "here" / "master_bias_vis.fits"
    trap.write_bytes(Path(frames[0]).read_bytes())
    trap_sof = tmp_path / "trap.sof"
    trap_sof.write_text(f"{trap} BIAS_VIS\n" + "".join(f"{p} BIAS_VIS\n" for p in frames[1:]))
    kept = _digest([trap])
    _fails(capsys, ["--output-dir", str(tmp_path / "here"), "--overwrite", "soxs_mbias",
                    str(trap_sof)], "would overwrite an input frame")
    assert _digest([trap]) == kept
    assert _digest([sof, rc, settings, *frames]) == before
    assert not product.exists()


def test_existing_products_sof_and_rc_replaced_only_with_overwrite(night, tmp_path, capsys):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    out, psof, rc = tmp_path / "out", tmp_path / "p.sof", tmp_path / "x.rc"
    psof.write_text("precious\n")
    rc.write_text("# precious\n")
    _fails(capsys, ["--output-dir", str(out), "--products-sof", str(psof), "soxs_mbias",
                    str(sof)], "exists already", "--overwrite")
    assert not (out / "master_bias_vis.fits").exists()  # refused before reducing
    _fails(capsys, ["--create-config", str(rc), "soxs_mbias"], "exists already")
    assert psof.read_text() == "precious\n" and rc.read_text() == "# precious\n"
    assert esorex(["--output-dir", str(out), "--products-sof", str(psof), "--overwrite",
                   "soxs_mbias", str(sof)]) == 0
    assert psof.read_text().split() == [str(out / "master_bias_vis.fits"), "MASTER_BIAS_VIS"]
    assert esorex(["--create-config", str(rc), "--overwrite", "soxs_mbias"]) == 0
    assert "soxs.soxs_mbias.stacking-method=" in rc.read_text()
    assert not list(tmp_path.glob(TEMP_GLOB)) and not list(out.glob(TEMP_GLOB))


def test_unwritable_outputs_refused_before_reducing(night, tmp_path, capsys):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    out = tmp_path / "out"
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (["--products-sof", str(tmp_path / "adir")], "is a directory"),
        (["--products-sof", str(blocker / "p.sof")], "not a directory"),
        (["--products-sof", str(tmp_path / "no" / "p.sof")], "does not exist"),
        (["--log-file", str(tmp_path / "adir")], "is a directory"),
        (["--log-file", str(blocker / "x.log")], "not a directory"),
        (["--log-dir", str(blocker)], "--log-dir is not a directory"),
        (["--log-dir", str(tmp_path / "nowhere")], "--log-dir does not exist"),
        (["--log-file", str(tmp_path / "nonexistent" / "dir" / "x.log")], "does not exist"),
    ]
    for extra, expect in cases:
        err = _fails(capsys, ["--output-dir", str(out), *extra, "soxs_mbias", str(sof)],
                     expect)
        assert str(Path(extra[1]).name) in err
        assert not (out / "master_bias_vis.fits").exists(), extra
    assert not (tmp_path / "nonexistent").exists()  # the log's directory is not created
    assert not (tmp_path / "nowhere").exists()


def test_log_and_products_sof_may_go_in_the_output_dir_it_creates(night, tmp_path):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    out = tmp_path / "new" / "out"
    assert esorex(["--output-dir", str(out), "--log-file", str(out / "esorex.log"),
                   "--products-sof", str(out / "products.sof"), "soxs_mbias", str(sof)]) == 0
    assert "master_bias_vis.fits" in (out / "esorex.log").read_text()
    assert (out / "products.sof").read_text().split() == [str(out / "master_bias_vis.fits"),
                                                          "MASTER_BIAS_VIS"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directories_refused_before_reducing(night, tmp_path, capsys):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for option in ("--products-sof", "--log-file"):
            _fails(capsys, ["--output-dir", str(tmp_path / "out"), option,
                            str(locked / "f"), "soxs_mbias", str(sof)], "not writable")
            assert not (tmp_path / "out" / "master_bias_vis.fits").exists()
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ 1. signals, debris
# Runs soxs-esorex's entry point with a product writer that writes a little, says so in a
# flag file and then waits: the signal is sent while the product is half written.
PAUSED_WRITER = r"""
import sys, time
from pathlib import Path
import soxs_core.io.products as products

flag = Path(sys.argv[1])

def paused_write(fh, hdus):
    fh.write(b"\0" * 28800)
    fh.flush()
    flag.write_text("writing")
    time.sleep(300)

products.write_fits = paused_write
from soxs_recipes.cli import main
sys.argv = ["soxs-esorex", *sys.argv[2:]]
main()
"""


def _start_paused(tmp_path, argv):
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, str(flag), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run never reached the product writer"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_writing_leaves_no_temporary(night, tmp_path, signum):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    out = tmp_path / "out"
    proc = _start_paused(tmp_path, ["--output-dir", str(out), "soxs_mbias", str(sof)])
    assert list(out.glob(TEMP_GLOB)), "no temporary file while writing: the test is void"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert err.strip().splitlines() == [
        f"soxs-esorex: ERROR: interrupted by {signal.Signals(signum).name}"]
    assert not list(out.glob(TEMP_GLOB)) and not list(out.glob("*.fits"))


def test_stale_temporary_of_a_killed_run_is_removed_by_the_next(night, tmp_path, capsys):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    out = tmp_path / "out"
    proc = _start_paused(tmp_path, ["--output-dir", str(out), "soxs_mbias", str(sof)])
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=60)
    (stale,) = out.glob(TEMP_GLOB)
    # beside it: one of a living process (ours), the same but untouched for two days, and a
    # hidden .tmp file that is not ours
    match = re.search(r"-(\d+)-([0-9a-f]{8})\.tmp$", stale.name)
    assert match and int(match[1]) == proc.pid
    living = out / stale.name.replace(f"-{proc.pid}-", f"-{os.getpid()}-")
    living.write_bytes(b"x")
    old = out / living.name.replace(match[2], "0badc0de")
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    foreign = out / ".notes.fits.tmp"
    foreign.write_bytes(b"x")
    assert esorex(["--output-dir", str(out), "soxs_mbias", str(sof)]) == 0
    assert not stale.exists() and not old.exists()
    assert living.exists() and foreign.exists()
    with fits.open(out / "master_bias_vis.fits", checksum=True) as hdul:
        assert all(h.verify_checksum() == 1 for h in hdul)
    assert "interrupted run" in capsys.readouterr().out


def test_sigterm_at_any_moment_leaves_nothing_behind(night, tmp_path):
    """The real console script killed at moments spread over a whole run, start-up included."""
    _, arms = night
    sof, _ = arms["xsh_vis"]
    exe = str(EXE / "soxs-esorex")
    durations = []
    for _ in range(2):  # a fresh install's first run compiles .pyc files: time a warm run
        started = time.monotonic()
        subprocess.run([exe, "--output-dir", str(tmp_path / "full"), "--overwrite",
                        "soxs_mbias", str(sof)], check=True, capture_output=True)
        durations.append(time.monotonic() - started)
    duration = min(durations)
    interrupted = 0
    for i, fraction in enumerate((0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.97)):
        out = tmp_path / f"out{i}"
        proc = subprocess.Popen([exe, "--output-dir", str(out), "soxs_mbias", str(sof)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(fraction * duration)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        lines = err.strip().splitlines()
        assert "Traceback" not in err, err
        assert proc.returncode in (0, 143, -signal.SIGTERM), (fraction, err)
        if proc.returncode == 143:
            interrupted += 1
            assert lines == ["soxs-esorex: ERROR: interrupted by SIGTERM"], err
        else:  # finished, or killed before Python ran any of our code: silent
            assert lines == [], err
        assert not list(out.glob(TEMP_GLOB)) if out.is_dir() else True
        product = out / "master_bias_vis.fits"
        if product.exists():  # a product that exists is whole
            with fits.open(product, checksum=True) as hdul:
                assert all(h.verify_checksum() == 1 for h in hdul)
    assert interrupted >= 3  # the handler really ran, not only the default action


@pytest.mark.parametrize("declared", [True, False])
def test_the_allocator_is_tuned_only_for_recipes_that_declare_it(night, tmp_path, monkeypatch,
                                                                 declared):
    """soxs-esorex keeps freed arrays in glibc's heap for the recipes whose spec asks for it
    (the masters), not for soxs_stare (its peak would grow), nor in a caller's process."""
    import dataclasses

    from soxs_recipes import mbias, runner, stare

    calls = []
    monkeypatch.setattr(runner, "reuse_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(mbias, "SPEC", dataclasses.replace(mbias.SPEC,
                                                           reuse_freed_memory=declared))
    _, arms = night
    sof, _ = arms["xsh_vis"]
    for tune, wanted in ((False, []), (True, [True] if declared else [])):
        calls.clear()
        assert esorex(["--output-dir", str(tmp_path / f"out{tune}"), "soxs_mbias", str(sof)],
                      tune_memory=tune) == 0
        assert calls == wanted, tune
    assert mbias.SPEC.reuse_freed_memory is declared
    assert stare.SPEC.reuse_freed_memory is False


@pytest.mark.parametrize("program,extra", [
    ("soxs-simulate", ["--arm", "xsh_vis", "--binning", "2x2", "-q"]),
    ("soxs-demo", ["--arm", "xsh_vis", "--binning", "2x2"]),
])
def test_simulator_and_demo_handle_sigterm(tmp_path, program, extra):
    night_dir = tmp_path / "night"
    proc = subprocess.Popen([str(EXE / program), str(night_dir), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not night_dir.exists():  # its main() is running: the handlers are installed
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [f"{program}: ERROR: interrupted by SIGTERM"]


# ------------------------------------------------------------------ 2. parameters
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
@pytest.mark.parametrize("name", ["stacked-clipping-sigma", "stacked-clipping-iterations"])
def test_non_finite_parameters_refused_from_every_source(night, tmp_path, capsys, name,
                                                         value):
    _, arms = night
    sof, frames = arms["xsh_vis"]
    out = tmp_path / "out"
    rc = tmp_path / "x.rc"
    rc.write_text(f"soxs.soxs_mbias.{name}={value}\n")
    settings = tmp_path / "s.yaml"
    settings.write_text(f"soxs-mbias:\n  vis:\n    {name}: {value}\n")
    for extra, where in ((["soxs_mbias", f"--{name}={value}"], "command line"),
                         (["--recipe-config", str(rc), "soxs_mbias"], "x.rc: line 1"),
                         (["--settings", str(settings), "soxs_mbias"], "s.yaml")):
        _fails(capsys, ["--output-dir", str(out), *extra, str(sof)], where, name,
               "not a finite number")
    # the Python APIs: the PyRecipe class as pyesorex calls it, and the soxspipe style
    from soxs_core.errors import InputError
    from soxs_recipes.compat import ui

    recipe = SoxsMbias()
    recipe.output_dir = str(out)
    with pytest.raises(InputError, match=f"{name}.*not a finite number"):
        recipe.run(ui.FrameSet(str(sof)), {f"soxs.soxs_mbias.{name}": float(value)})
    api = soxs_mbias(settings={"workspace-root-dir": str(tmp_path),
                               "soxs-mbias": {name: float(value)}},
                     inputFrames=[str(p) for p in frames])
    with pytest.raises(InputError, match=f"{name}.*not a finite number"):
        api.produce_product()
    assert not list(tmp_path.rglob("*.fits"))


def test_settings_unknown_key_is_named_with_its_file(night, tmp_path, capsys):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    settings = tmp_path / "s.yaml"
    settings.write_text("soxs-mbias:\n  stacked-clipping-sigmaa: 9\n"
                        "  vis:\n    frame-clipping-sigmas: 2\n    stacked-clipping-sigma: 6\n")
    out = tmp_path / "out"
    assert esorex(["--output-dir", str(out), "--settings", str(settings), "soxs_mbias",
                   str(sof)]) == 0
    text = capsys.readouterr().out
    warned = [line for line in text.splitlines() if "WARNING" in line and "s.yaml" in line]
    assert any("'stacked-clipping-sigmaa'" in line for line in warned), text
    assert any("'frame-clipping-sigmas'" in line and "vis" in line for line in warned), text
    assert _params(out / "master_bias_vis.fits")["stacked-clipping-sigma"] == "6"


# ------------------------------------------------------------------ 3. one line, named
def test_bad_option_files_get_one_line(night, tmp_path, capsys):
    _, arms = night
    sof, frames = arms["xsh_vis"]
    out = ["--output-dir", str(tmp_path / "out")]
    binary = tmp_path / "bin.rc"
    binary.write_bytes(bytes(range(256)) * 4)
    _fails(capsys, [*out, "--recipe-config", str(binary), "soxs_mbias", str(sof)],
           "bin.rc", "binary file")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"soxs-mbias:\n\0\0\0\n")
    _fails(capsys, [*out, "--settings", str(nul), "soxs_mbias", str(sof)], "nul.yaml",
           "binary file")
    _fails(capsys, [*out, "soxs_mbias", str(frames[0])], Path(frames[0]).name,
           "is a FITS file, not an SOF")
    _fails(capsys, [*out, "soxs_mbias", str(binary)], "bin.rc", "binary file")
    _fails(capsys, [*out, "soxs_mbias", str(tmp_path)], "is a directory")


@pytest.mark.parametrize("length", [300, 5000, 100_000])
def test_overlong_sof_path_is_named_shortened(tmp_path, capsys, length):
    name = "b" * (length - 10) + "_tail.sof"
    err = _fails(capsys, ["--output-dir", str(tmp_path / "out"), "soxs_mbias", name],
                 "_tail.sof")
    assert "too long" in err.lower() or "not found" in err
    assert len(err) < 400 and "\N{HORIZONTAL ELLIPSIS}" in err


def test_sof_with_byte_order_mark_is_accepted(night, tmp_path, capsys):
    _, arms = night
    sof, frames = arms["xsh_vis"]
    bom = tmp_path / "bom.sof"
    bom.write_bytes(b"\xef\xbb\xbf" + sof.read_bytes())
    out = tmp_path / "out"
    assert esorex(["--output-dir", str(out), "soxs_mbias", str(bom)]) == 0, \
        capsys.readouterr().err
    h = fits.getheader(out / "master_bias_vis.fits")
    assert [h[f"ESO PRO REC1 RAW{i} NAME"] for i in (1, 2, 3)] == [Path(p).name
                                                                    for p in frames]


# ------------------------------------------------------------------ 4. esorex habits
def test_create_config_spellings(night, tmp_path, monkeypatch, capsys):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    monkeypatch.chdir(tmp_path)
    assert esorex(["--create-config", "soxs_mbias"]) == 0
    assert "soxs.soxs_mbias.stacking-method" in (tmp_path / "soxs_mbias.rc").read_text()
    (tmp_path / "soxs_mbias.rc").unlink()
    assert esorex(["--create-config=TRUE", "soxs_mbias"]) == 0
    assert (tmp_path / "soxs_mbias.rc").is_file() and not (tmp_path / "TRUE").exists()
    assert esorex(["--create-config=mine.rc", "soxs_mdark"]) == 0
    assert "soxs.soxs_mdark." in (tmp_path / "mine.rc").read_text()
    # FALSE: no configuration file, the recipe runs
    assert esorex(["--create-config=FALSE", "--output-dir", "out", "soxs_mbias",
                   str(sof)]) == 0
    assert (tmp_path / "out" / "master_bias_vis.fits").is_file()
    assert sorted(p.name for p in tmp_path.glob("*.rc")) == ["mine.rc", "soxs_mbias.rc"]
    assert not (tmp_path / "FALSE").exists()


def test_create_config_round_trip_keeps_the_arm_defaults(night, tmp_path, capsys):
    _, arms = night
    sof, _ = arms["xsh_uvb"]
    truth = yaml.safe_load(DEFAULTS.read_text())["soxs_mbias"]["parameters"]
    expected = {name: (value["xsh_uvb"] if isinstance(value, dict) else value)
                for name, value in truth.items()}

    def run_with(rc, name):
        out = tmp_path / name
        argv = ["--output-dir", str(out), "soxs_mbias", str(sof)]
        if rc is not None:
            argv[:0] = ["--recipe-config", str(rc)]
        assert esorex(argv) == 0, capsys.readouterr().err
        return _params(out / "master_bias_uvb.fits")

    def same(params):
        assert set(params) == set(expected)
        for name, value in expected.items():
            if isinstance(value, str):
                assert params[name] == value, name
            else:
                assert float(params[name]) == float(value), name

    with_sof = tmp_path / "uvb.rc"
    assert esorex(["--create-config", str(with_sof), "soxs_mbias", str(sof)]) == 0
    assert "XSHOOTER UVB" in with_sof.read_text()
    same(run_with(with_sof, "with_sof"))
    generic = tmp_path / "generic.rc"
    assert esorex(["--create-config", str(generic), "soxs_mbias"]) == 0
    no_config = run_with(None, "no_config")
    same(no_config)
    assert run_with(generic, "generic") == no_config


def test_no_arguments_prints_the_help(capsys):
    assert esorex([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: soxs-esorex") and "--create-config" in out


def test_msg_level_debug_shows_debug_messages(night, tmp_path, capsys):
    _, arms = night
    sof, _ = arms["xsh_vis"]
    assert esorex(["--output-dir", str(tmp_path / "a"), "soxs_mbias", str(sof)]) == 0
    assert "DEBUG" not in capsys.readouterr().out
    log = tmp_path / "run.log"
    assert esorex(["--output-dir", str(tmp_path / "b"), "--msg-level", "debug",
                   "--log-file", str(log), "--log-level", "debug", "soxs_mbias",
                   "--stacked-clipping-sigma=4", str(sof)]) == 0
    debug = [line for line in capsys.readouterr().out.splitlines() if "DEBUG" in line]
    assert any("stacked-clipping-sigma = 4.0 (set explicitly)" in line for line in debug)
    assert any("frame-clipping-sigma = 3.0 (default for XSHOOTER VIS)" in line
               for line in debug)
    assert "stacked-clipping-sigma = 4.0" in log.read_text()
    # a failure: its line in the log file too, and its traceback there only (debug level)
    assert esorex(["--msg-level", "debug", "--log-file", str(log), "--log-level", "debug",
                   "--output-dir", str(tmp_path / "b"), "soxs_mbias", str(sof)]) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert captured.err.count("\n") == 1 and "exists already" in captured.err
    assert "Traceback" in log.read_text()
    assert "ERROR] soxs: " in log.read_text() and "exists already" in log.read_text()


def test_scratch_of_a_killed_run_is_removed_and_plain_inputs_need_none(night, tmp_path):
    """Decompressed copies of inputs live in a scratch directory named after its process: one
    that a SIGKILL left (its process is gone) is removed by the next run, a living process's
    is kept, and a run on plain FITS frames makes none."""
    import tempfile

    from soxs_core.io import safety

    _, arms = night
    sof, _ = arms["xsh_vis"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = safety._host_tag()
    stale = Path(tempfile.mkdtemp(prefix=f"soxs-{tag}-{dead.pid}-"))
    (stale / "frame.fits.expanded.fits").write_bytes(b"x" * 2880)
    living = Path(tempfile.mkdtemp(prefix=f"soxs-{tag}-1-"))  # pid 1 always exists
    try:
        before = {p.name for p in Path(tempfile.gettempdir()).glob("soxs-*")}
        assert esorex(["--output-dir", str(tmp_path / "out"), "soxs_mbias", str(sof)]) == 0
        after = {p.name for p in Path(tempfile.gettempdir()).glob("soxs-*")}
        assert not stale.exists()
        assert living.exists()
        assert after == before - {stale.name}
    finally:
        for path in (stale, living):
            if path.exists():
                subprocess.run(["rm", "-rf", str(path)], check=True)


@pytest.mark.parametrize("argv, needle", [
    (["--log-level", "bogus", "soxs_mbias"], "--log-level"),
    (["--output-dir"], "--output-dir"),
    (["--msg-level"], "--msg-level"),
    (["--params"], "no recipe given"),
])
def test_refused_runner_options_are_one_line(argv, needle, capsys):
    try:
        code = esorex(argv)
    except SystemExit as exc:  # argparse refuses by exiting
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "usage" not in err


def test_simulator_interrupted_while_writing_leaves_only_complete_files(tmp_path):
    """Frames, tables and SOFs are renamed into place when complete: after a SIGTERM at any
    of several moments while the raw frames are written, every file there reads in full and
    no temporary is left."""
    for delay in (0.0, 0.1, 0.25, 0.45, 0.7, 1.0):
        night_dir = tmp_path / f"night{delay}"
        proc = subprocess.Popen([str(EXE / "soxs-simulate"), str(night_dir), "--arm",
                                 "xsh_vis", "--binning", "1x1", "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (night_dir.exists() and any(night_dir.rglob("*.fits*"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 143
        assert not [p for p in night_dir.rglob("*") if p.name.endswith(".tmp")]
        for path in night_dir.rglob("*.fits"):
            with fits.open(path) as hdul:
                for hdu in hdul:
                    if hdu.header.get("NAXIS", 0):
                        assert hdu.data is not None and hdu.data.size > 0, path


def test_a_run_failing_after_writing_leaves_none_of_its_outputs(night, tmp_path):
    """Products and plots written before a failure are removed; a plot of an earlier run
    that this one handed out but did not rewrite stays."""
    from soxs_core.errors import InputError
    from soxs_recipes import mbias
    from soxs_recipes.framework import OutputSpec, execute, frames_from_sof

    root, sofs = night
    sof, _ = sofs["xsh_vis"]
    out = tmp_path / "out"
    out.mkdir()
    new_plot = OutputSpec("NEW PLOT", "NEW_PLOT", "written by the failing run", kind="plot")
    old_plot = OutputSpec("OLD PLOT", "OLD_PLOT", "of an earlier run", kind="plot")
    arm = next(a for a in mbias.SPEC.accepted_arms()
               if (a.instrument, a.name) == ("XSHOOTER", "VIS"))
    earlier = out / old_plot.filename_for(arm)
    earlier.write_text("earlier")
    written = []

    def reduce_then_fail(context):
        mbias.reduce(context)
        written.extend(p.path for p in context.products)
        context.plot_path(new_plot).write_text("plot")
        written.append(context.plot_path(new_plot))
        assert context.plot_path(old_plot) == earlier
        raise InputError("a step after the products failed")

    with pytest.raises(InputError, match="failed"):
        execute(mbias.SPEC, frames_from_sof(sof), {}, reduce_then_fail, out)
    assert len(written) >= 2 and not any(Path(p).exists() for p in written)
    assert earlier.read_text() == "earlier"
    assert sorted(p.name for p in out.iterdir()) == [earlier.name]
