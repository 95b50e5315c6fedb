"""The command-line tools ``soxs-simulate`` and ``soxs-demo``: every bad argument is refused in
one line before anything is created, the help is complete, and the README's manual flow works
exactly as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.detector.instruments import ARMS
from soxs_core.simulate import cli as simulate_cli
from soxs_core.simulate.cli import build_parser
from soxs_core.simulate.echelle import load_format
from soxs_recipes import demo
from soxs_recipes.cli import run as esorex
from soxs_recipes.registry import RECIPES

README = Path(__file__).resolve().parents[1] / "README.md"
MANUAL_FLOW_HEADING = "### Reducing a simulated night by hand"

#: the smallest night a case needs if a bad value were (wrongly) accepted: one bias, no more
SMALL = ["--n-bias", "1", "--n-dark", "0", "--n-flat", "0", "--n-science", "0", "--n-std", "0",
         "-q"]


def run_tool(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a tool's ``main`` in this process; argparse's refusals exit, so catch that too."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_refusal(code: int, err: str, *needles: str) -> None:
    """Non-zero status, exactly one line on stderr, naming every needle, no traceback."""
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err.lower(), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def vis_orders() -> tuple[int, int]:
    orders = load_format("xsh_vis").orders
    return int(orders.min()), int(orders.max())


# ------------------------------------------------------------------------ soxs-simulate


def _simulate_cases() -> list[tuple[list[str], tuple[str, ...]]]:
    lo, hi = vis_orders()
    vis_binnings = ", ".join(ARMS["xsh_vis"].binnings)
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        (["--n-bias", "-1"], ("--n-bias", "-1", ">= 0")),
        (["--orders", "999"], ("--orders", "999", str(lo), str(hi))),
        (["--orders", "20,20"], ("--orders", "20")),
        (["--orders", "a,b"], ("--orders", "a,b")),
        (["--seeing", "-1"], ("--seeing", "-1", "> 0")),
        (["--arm", "xsh_nir", "--binning", "2x2"], ("--binning", "2x2", "xsh_nir", "1x1")),
        (["--binning", "3x3"], ("--binning", "3x3", vis_binnings)),
        (["--binning", "2"], ("--binning", "'2'")),
        (["--arm", "xsh_nir", "--readout", "fast"], ("--readout", "fast", "xsh_nir")),
        (["--readout", "medium"], ("--readout", "medium")),
        (["--arm", "bogus"], ("--arm", "bogus")),
        (["--arm", ""], ("--arm",)),
        (["--arm", "xsh_vis,xsh_vis"], ("--arm", "xsh_vis")),
        (["--standard", "Vega"], ("--standard", "Vega", "GD71")),
        (["--object-position", "7"], ("--object-position", "7", "5.5")),
        (["--seed", "-1"], ("--seed", "-1", ">= 0")),
        (["--seed", str(2**32)], ("--seed", str(2**32))),
        (["--seed", "x"], ("--seed", "'x'")),
        (["--airmass", "0.5"], ("--airmass", "0.5", ">= 1")),
        (["--bogus"], ("--bogus",)),
        (["--seeing"], ("--seeing", "expected one argument")),
    ]
    for option in ("--n-bias", "--n-dark", "--n-flat", "--n-science", "--n-std"):
        cases += [([option, value], (option, value)) for value in ("-2", "2.5", "x")]
    for option in ("--dark-exptime", "--flat-exptime", "--science-exptime", "--std-exptime",
                   "--seeing", "--slit-width", "--flat-level"):
        cases += [([option, value], (option, value)) for value in ("0", "-1", "nan", "1e400")]
    for option in ("--sky-level", "--cosmic-rate"):
        cases += [([option, value], (option, value)) for value in ("-1", "nan", "inf")]
    for option in ("--object-mag", "--object-position", "--airmass"):
        cases += [([option, value], (option, value)) for value in ("nan", "inf", "x")]
        # argparse takes a lone "-inf" for an option; the "=" form reaches the value check
        cases.append(([f"{option}=-inf"], (option, "-inf")))
    return cases


@pytest.mark.parametrize("extra,needles", _simulate_cases(),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_simulate_refuses_bad_arguments_in_one_line_and_creates_nothing(
        tmp_path, capsys, extra, needles):
    night = tmp_path / "night"
    code, out, err = run_tool(simulate_cli.main, [str(night)] + SMALL + extra, capsys)
    assert_one_line_refusal(code, err, *needles)
    assert not night.exists()


def test_simulate_without_outdir_is_one_line(capsys):
    code, out, err = run_tool(simulate_cli.main, [], capsys)
    assert_one_line_refusal(code, err, "outdir")


def test_simulate_refuses_a_file_as_outdir(tmp_path, capsys):
    target = tmp_path / "night.fits"
    target.write_bytes(b"not a directory")
    code, out, err = run_tool(simulate_cli.main, [str(target)] + SMALL, capsys)
    assert_one_line_refusal(code, err, str(target), "not a directory")
    assert target.read_bytes() == b"not a directory"


def test_simulate_refuses_an_outdir_it_cannot_create(tmp_path, capsys):
    # below a regular file: no directory can be made there, whoever runs the test
    blocker = tmp_path / "file"
    blocker.write_text("x")
    night = blocker / "night"
    code, out, err = run_tool(simulate_cli.main, [str(night)] + SMALL, capsys)
    assert_one_line_refusal(code, err, str(night))


def test_simulate_refuses_an_unwritable_outdir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").exists() or _can_write(locked):
            pytest.skip("running with privileges that ignore directory permissions")
        code, out, err = run_tool(simulate_cli.main, [str(locked / "night")] + SMALL, capsys)
        assert_one_line_refusal(code, err, str(locked / "night"))
    finally:
        locked.chmod(0o700)


def _can_write(directory: Path) -> bool:
    try:
        (directory / "probe").write_text("")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


def test_simulate_as_a_program_prints_no_traceback(tmp_path):
    """Through the interpreter's exit path, as the console script runs it."""
    target = tmp_path / "taken"
    target.write_text("")
    proc = subprocess.run([sys.executable, "-m", "soxs_core.simulate.cli", str(target)],
                          capture_output=True, text=True, timeout=120)
    assert_one_line_refusal(proc.returncode, proc.stderr, str(target), "not a directory")


def _help_entries(text: str) -> dict[str, str]:
    """Long option -> its whole (unwrapped) help entry, from ``--help`` output."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):
            spec = line.strip().split("  ")[0]          # "-q, --quiet" or "--seed SEED"
            current = (re.findall(r"--[\w-]+", spec) or spec.split())[0]
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    entries.pop("--help", None)
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_simulate_help_gives_every_option_a_text_and_default(capsys):
    code, out, err = run_tool(simulate_cli.main, ["--help"], capsys)
    assert code == 0
    entries = _help_entries(out)
    options = [a.option_strings[-1] for a in build_parser()._actions
               if a.option_strings and a.dest != "help"]
    assert len(options) > 20 and set(options) <= set(entries), (options, entries)
    for option in options:
        assert "default" in entries[option].lower(), entries[option]
        assert "None" not in entries[option], entries[option]


def test_simulate_prints_the_commands_that_reduce_the_night(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_tool(simulate_cli.main, [
        "n1", "--arm", "soxs_vis", "--binning", "2x2", "--n-bias", "3", "--n-dark", "3",
        "--n-flat", "0", "--n-science", "0", "--n-std", "0"], capsys)
    assert code == 0, err
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("soxs-")]
    assert commands == [
        "soxs-esorex --output-dir n1/reduced/soxs_mbias soxs_mbias n1/bias.sof",
        "soxs-esorex --output-dir n1/reduced/soxs_mdark soxs_mdark n1/dark.sof"]


# ------------------------------------------------------------------------ soxs-demo


def _demo_cases() -> list[tuple[list[str], tuple[str, ...]]]:
    need = RECIPES["soxs_mbias"].SPEC.inputs[0].min_count
    return [
        (["--arm", "bogus"], ("--arm", "bogus")),
        (["--binning", "3x3"], ("--binning", "3x3", ", ".join(ARMS["soxs_vis"].binnings))),
        (["--arm", "xsh_nir", "--binning", "2x2"], ("--binning", "2x2", "xsh_nir")),
        (["--n-bias", "-1"], ("--n-bias", "-1")),
        (["--n-bias", str(need - 1)], ("--n-bias", str(need - 1), str(need), "soxs_mbias")),
        (["--n-dark", "x"], ("--n-dark", "'x'")),
        (["--seed", "-1"], ("--seed", "-1")),
        (["--seed", "1.5"], ("--seed", "1.5")),
        (["--seed"], ("--seed", "expected one argument")),
        (["--bogus"], ("--bogus",)),
    ]


@pytest.mark.parametrize("extra,needles", _demo_cases(),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_demo_refuses_bad_arguments_in_one_line_and_creates_nothing(
        tmp_path, capsys, extra, needles):
    night = tmp_path / "demo_night"
    code, out, err = run_tool(demo.main, [str(night)] + extra, capsys)
    assert_one_line_refusal(code, err, *needles)
    assert not night.exists()


def test_demo_refuses_a_file_as_night_directory(tmp_path):
    target = tmp_path / "night.txt"
    target.write_text("keep me")
    proc = subprocess.run([sys.executable, "-c", "from soxs_recipes.demo import entry; entry()",
                           str(target)], capture_output=True, text=True, timeout=120)
    assert_one_line_refusal(proc.returncode, proc.stderr, str(target), "not a directory")
    assert target.read_text() == "keep me"


def test_demo_help_shows_no_markup_and_every_default(capsys):
    code, out, err = run_tool(demo.main, ["--help"], capsys)
    assert code == 0
    for markup in ("``", "::", ":func:", ":class:", ":mod:", "`"):
        assert markup not in out, (markup, out)
    entries = _help_entries(out)
    assert {"--arm", "--binning", "--seed", "--n-bias", "--n-dark"} <= set(entries)
    for entry in entries.values():
        assert "default" in entry.lower(), entry


# ------------------------------------------------------------------------ README manual flow


def readme_manual_flow() -> list[list[str]]:
    """The command lines of the README's manual-flow block, split as a shell would."""
    text = README.read_text()
    assert MANUAL_FLOW_HEADING in text, f"README.md has no section {MANUAL_FLOW_HEADING!r}"
    section = text.split(MANUAL_FLOW_HEADING, 1)[1]
    block = re.search(r"```[^\n]*\n(.*?)```", section, re.S)
    assert block, "the manual-flow section has no code block"
    return [shlex.split(line) for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_manual_flow_works_as_written(tmp_path, capsys, monkeypatch):
    """Simulate (small), then run the README's soxs-esorex lines verbatim; the master dark
    must be bias-subtracted with the master bias they made."""
    commands = readme_manual_flow()
    assert [c[0] for c in commands][:3] == ["soxs-simulate", "soxs-esorex", "soxs-esorex"]
    simulate, reductions = commands[0], commands[1:]
    assert all(c[0] == "soxs-esorex" for c in reductions)
    args = build_parser().parse_args(simulate[1:])
    (arm,) = args.arm
    # a small night of the README's arm: few frames, one order, the most-binned set-up
    small = ["--binning", arm.binnings[-1], "--n-bias", "3", "--n-dark", "3", "--n-flat", "5",
             "--n-science", "1", "--n-std", "1", "--dark-exptime", "600",
             "--orders", str(int(load_format(arm.code).orders[0]))]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_tool(simulate_cli.main, simulate[1:] + small, capsys)
    assert code == 0, err
    # what soxs-simulate says to run next is what the README says
    printed = [shlex.split(line) for line in out.splitlines()
               if line.strip().startswith("soxs-esorex")]
    assert printed == reductions
    for command in reductions:
        assert esorex(command[1:]) == 0, command
    capsys.readouterr()

    night = args.outdir
    tag = arm.name
    mbias = night / "reduced" / "soxs_mbias" / f"master_bias_{tag.lower()}.fits"
    mdark = night / "reduced" / "soxs_mdark" / f"master_dark_{tag.lower()}.fits"
    header = fits.getheader(mdark)
    assert header["ESO PRO CATG"] == f"MASTER_DARK_{tag}"
    assert header["ESO PRO REC1 CAL1 CATG"] == f"MASTER_BIAS_{tag}"
    assert header["ESO PRO REC1 CAL1 NAME"] == mbias.name
    # and the bias really came off: the master dark's level is the true dark charge plus the
    # frames' known bias drifts, far below the bias pedestal it would keep without it
    with fits.open(night / "truth" / "detector_truth.fits") as truth:
        true_dark = float(np.median(truth["DARK_RATE"].data)) * 600.0
        pedestal = float(truth[0].header["BIASLEV"])
    frames = fits.getdata(night / "truth" / "frames.fits", "FRAMES")
    kinds = np.char.strip(frames["frame_type"])
    drift = (frames["bias_offset"][kinds == "DARK"].mean()
             - frames["bias_offset"][kinds == "BIAS"].mean())
    flux = fits.getdata(mdark, "FLUX")
    qual = fits.getdata(mdark, "QUAL")
    level = float(np.median(flux[qual == 0]))
    # the spread of the drifts themselves bounds what stacking may leave of them
    tolerance = 3 * float(np.std(frames["bias_offset"])) + 0.05
    assert abs(level - (true_dark + drift)) < tolerance, (level, true_dark, drift, tolerance)
    assert pedestal > 100 * tolerance
