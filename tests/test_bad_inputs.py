"""The bad-input matrix (issue 13): every expected failure exits with the documented code, prints
exactly one line on stderr and leaves no file under any output name.

Each case is one command line, run through click's CliRunner (in-process, so the table stays
fast); ``predict`` uses the disc oracle instead of a checkpoint except in the model cases.
Exit codes (cli/common.py): 1 an expected runtime failure, 2 a usage error found before any work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
from cellseg.cli.main import cellseg
from click.testing import CliRunner
from oracle import disc_image, use_oracle_in_cli
from PIL import Image
from slides import make_pyramid_tiff

SHARED_BROKEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "broken"
CMU = Path(__file__).resolve().parent / "data" / "CMU-1-Small-Region.svs"

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
    "<Annotations>&lol3;</Annotations>"
)
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    "<Annotations><Annotation>&xxe;</Annotation></Annotations>"
)
NO_REGIONS = '<Annotations MicronsPerPixel="0.25"><Annotation Id="1"/></Annotations>'
NAN_VERTEX = (
    '<Annotations><Annotation><Regions><Region Id="1"><Vertices><Vertex X="1" Y="1"/>'
    '<Vertex X="nan" Y="5"/><Vertex X="5" Y="5"/></Vertices></Region></Regions></Annotation>'
    "</Annotations>"
)
TRUNCATED_XML = "<Annotations><Annotation><Regions><Region"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every bad (and a few good) input files, in one folder that no case writes to."""
    folder = tmp_path_factory.mktemp("inputs")
    image, _ = disc_image(
        300, 300, [(y, x) for y in range(40, 280, 60) for x in range(40, 280, 60)]
    )
    make_pyramid_tiff(folder / "good.svs", image, 0.5, levels=1)
    (folder / "sub").mkdir()
    make_pyramid_tiff(folder / "sub" / "good.svs", image, 0.5, levels=1)
    make_pyramid_tiff(folder / "no_mpp.svs", image, None, levels=1)
    Image.fromarray(image).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(image).save(folder / "self.png")
    _write_corrupt_tile_slide(folder / "corrupt_tile.svs", image)
    (folder / "empty.svs").write_bytes(b"")
    (folder / "garbage.svs").write_bytes(b"\x00not a slide" * 200)
    (folder / "text.png").write_text("this is not a picture\n" * 20)
    if CMU.is_file():  # a real slide cut short, as an interrupted copy leaves it
        (folder / "truncated.svs").write_bytes(CMU.read_bytes()[:1_500_000])
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" * 9)
    _write_foreign_models(folder)
    for name, text in {
        "bomb": BILLION_LAUGHS,
        "xxe": EXTERNAL_ENTITY,
        "noregions": NO_REGIONS,
        "nan": NAN_VERTEX,
        "truncxml": TRUNCATED_XML,
    }.items():
        data = folder / f"data_{name}"
        data.mkdir()
        Image.fromarray(image[:64, :64]).save(data / "a.tif")
        (data / "a.xml").write_text(text)
    return folder


def _write_corrupt_tile_slide(path: Path, image) -> None:
    """A JPEG slide whose first tile no longer starts like a JPEG stream (bit rot)."""
    import tifffile

    make_pyramid_tiff(path, image, 0.5, levels=1, compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _write_foreign_models(folder: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, str(folder / "foreign.safetensors"))
    torch.save({"weight": torch.zeros(3, 3)}, folder / "pickled.pt")


@contextlib.contextmanager
def _readonly_mount(path: Path):
    """A read-only tmpfs at ``path`` (needs mount rights: root in a container), else None."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _mount(path, "ro,size=1m")
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _mount(path: Path, options: str) -> bool:
    """Mounts a tmpfs with ``options`` at ``path``; False where that is not allowed."""
    if os.environ.get("CELLSEG_TEST_NO_MOUNT"):  # to exercise the fallbacks
        return False
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
    except OSError:  # no mount command
        return False
    return done.returncode == 0


@pytest.fixture
def readonly(tmp_path, monkeypatch):
    """A folder that cannot be written: a read-only mount when allowed, else one whose writes
    fail with EROFS (the same errno a read-only mount gives)."""
    folder = tmp_path / "ro"
    with _readonly_mount(folder) as mounted:
        if not mounted:
            real_open = os.open

            def refuse(path, flags, *args, **kwargs):
                if str(path).startswith(str(folder)) and flags & os.O_CREAT:
                    raise OSError(errno.EROFS, "Read-only file system", str(path))
                return real_open(path, flags, *args, **kwargs)

            monkeypatch.setattr("cellseg.outputs.os.open", refuse)
        yield folder


@pytest.fixture
def disk_full(monkeypatch):
    """The disk fills up at the first region: the journal's append fails with ENOSPC."""
    from cellseg.journal import Journal

    real = Journal.record_region
    calls = {"n": 0}

    def record(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Journal, "record_region", record)


def _oracle(monkeypatch) -> None:
    use_oracle_in_cli(monkeypatch)


# (id, command line with {in}/{out}/{ro} placeholders, exit code, stderr fragment, outputs,
#  needs): outputs are names under {out}; needs: "oracle" (disc oracle), "model" (real loading),
#  "cmu", "shared", "readonly", "disk_full".
CASES = [
    ("missing", "predict {in}/missing.svs --out {out}/n.geojson", 1, "no such file",
     ["n.geojson"], "oracle"),
    ("empty", "predict {in}/empty.svs --out {out}/n.geojson", 1, "empty.svs", ["n.geojson"],
     "oracle"),
    ("truncated", "predict {in}/truncated.svs --out {out}/n.geojson --zarr {out}/n.zarr", 1,
     "truncated", ["n.geojson", "n.zarr"], "oracle cmu"),
    ("truncated-tiffslide", "predict {in}/truncated.svs --backend tiffslide --out "
     "{out}/n.geojson", 1, "truncated", ["n.geojson"], "oracle cmu"),
    ("corrupt-tile", "predict {in}/corrupt_tile.svs --out {out}/n.geojson --zarr {out}/n.zarr",
     1, "corrupt_tile.svs", ["n.geojson", "n.zarr"], "oracle"),
    ("non-slide", "predict {in}/garbage.svs --out {out}/n.geojson", 1, "garbage.svs",
     ["n.geojson"], "oracle"),
    ("non-image", "predict {in}/text.png --mpp 0.5 --out {out}/n.geojson", 1, "text.png",
     ["n.geojson"], "oracle"),
    ("unreadable", "predict {shared}/unreadable.svs --out {out}/n.geojson", 1,
     "unreadable.svs", ["n.geojson"], "oracle shared"),
    ("unopenable", "predict {shared}/unopenable.tiff --out {out}/n.geojson", 1,
     "unopenable.tiff", ["n.geojson"], "oracle shared"),
    ("mpp-less", "predict {in}/no_mpp.svs --out {out}/n.geojson", 1, "pass --mpp",
     ["n.geojson"], "oracle"),
    ("roi-outside", "predict {in}/good.svs --roi 5000,5000,10,10 --out {out}/n.geojson", 1,
     "outside the slide", ["n.geojson"], "oracle"),
    ("roi-syntax", "predict {in}/good.svs --roi 1,2,3 --out {out}/n.geojson", 2, "X,Y,W,H",
     ["n.geojson"], "oracle"),
    ("mpp-nan", "predict {in}/good.svs --mpp nan --out {out}/n.geojson", 2, "--mpp nan",
     ["n.geojson"], "oracle"),
    ("mpp-inf", "predict {in}/good.svs --mpp inf --out {out}/n.geojson", 2, "--mpp inf",
     ["n.geojson"], "oracle"),
    ("mpp-100", "predict {in}/good.svs --mpp 100 --out {out}/n.geojson", 2,
     "--mpp 100: expected a resolution", ["n.geojson"], "oracle"),
    ("mpp-zero", "predict {in}/good.svs --mpp 0 --out {out}/n.geojson", 2, "--mpp",
     ["n.geojson"], "oracle"),
    ("shared-path", "predict {in}/rgba.png --mpp 0.5 --out {out}/x.json --summary {out}/x.json",
     2, "same file", ["x.json"], "oracle"),
    ("output-is-input", "predict {in}/self.png --mpp 0.5 --overlay {in}/self.png --overwrite",
     2, "is also an input", [], "oracle"),
    ("output-is-bookkeeping", "predict {in}/good.svs --out {out}/n.geojson --summary "
     "{out}/n.geojson.cellseg-provenance.json", 2, "same file", [], "oracle"),
    ("batch-output-clash", "predict {in}/good.svs {in}/sub/good.svs --out-dir {out}", 2,
     "share the name", [], "oracle"),
    ("readonly-out", "predict {in}/good.svs --out {ro}/n.geojson", 1, "cannot write",
     [], "oracle readonly"),
    ("readonly-out-dir", "predict {in}/good.svs {in}/rgba.png --out-dir {ro}/res", 1,
     "cannot write", [], "oracle readonly"),
    ("slide-is-a-folder", "predict {in}/sub --out {out}/n.geojson", 1, "is a folder",
     ["n.geojson"], "oracle"),
    ("evaluate-readonly-json", "evaluate --data {in}/data_nan --json {ro}/m.json", 1,
     "cannot write", [], "readonly"),
    ("train-readonly-out", "train --data {in}/data_nan --out {ro}/run", 1, "cannot write", [],
     "readonly"),
    ("disk-full", "predict {in}/good.svs --out {out}/n.geojson --zarr {out}/n.zarr --summary "
     "{out}/s.json", 1, "no space left on device", ["n.geojson", "n.zarr", "s.json"],
     "oracle disk_full"),
    ("corrupt-model", "predict {in}/good.svs --model {in}/corrupt.safetensors --out "
     "{out}/n.geojson", 1, "corrupt.safetensors", ["n.geojson"], "model"),
    ("foreign-model", "predict {in}/good.svs --model {in}/foreign.safetensors --out "
     "{out}/n.geojson", 1, "foreign.safetensors", ["n.geojson"], "model"),
    ("pickled-model", "predict {in}/good.svs --model {in}/pickled.pt --out {out}/n.geojson", 1,
     "pickled.pt", ["n.geojson"], "model"),
    ("missing-model", "predict {in}/good.svs --model {in}/none.safetensors --out "
     "{out}/n.geojson", 1, "none.safetensors", ["n.geojson"], "model"),
    ("xml-bomb", "evaluate --data {in}/data_bomb --json {out}/m.json", 1, "a.xml", ["m.json"],
     "model"),
    ("xml-external-entity", "evaluate --data {in}/data_xxe --json {out}/m.json", 1, "a.xml",
     ["m.json"], "model"),
    ("xml-truncated", "evaluate --data {in}/data_truncxml --json {out}/m.json", 1, "a.xml",
     ["m.json"], "model"),
    ("xml-no-regions", "evaluate --data {in}/data_noregions --json {out}/m.json", 1,
     "no Region", ["m.json"], "model"),
    ("xml-nan-vertex", "evaluate --data {in}/data_nan --json {out}/m.json", 1, "non-finite",
     ["m.json"], "model"),
    ("evaluate-missing-data", "evaluate --data {in}/nothing --json {out}/m.json", 1,
     "not found", ["m.json"], "model"),
]  # fmt: skip


@pytest.mark.parametrize(
    "command, code, fragment, outputs, needs", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gives_one_line_and_no_output(
    request, inputs, tmp_path, monkeypatch, command, code, fragment, outputs, needs
):
    if "cmu" in needs and not CMU.is_file():
        pytest.skip("tests/data/CMU-1-Small-Region.svs is missing")
    if "shared" in needs and not SHARED_BROKEN.is_dir():
        pytest.skip(f"shared data not available at {SHARED_BROKEN}")
    if "oracle" in needs:
        _oracle(monkeypatch)
    ro = request.getfixturevalue("readonly") if "readonly" in needs else tmp_path / "ro"
    if "disk_full" in needs:
        request.getfixturevalue("disk_full")
    out = tmp_path / "out"
    self_png = (inputs / "self.png").read_bytes()
    argv = command.format(**{"in": inputs, "out": out, "ro": ro, "shared": SHARED_BROKEN})
    result = CliRunner().invoke(cellseg, argv.split())
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1, lines
    assert lines[0].startswith(("error: ", "Error: ")) and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    for name in outputs:
        assert not (out / name).exists(), name
    if "disk_full" not in needs:  # a full disk keeps the work so far: the same command resumes
        assert not out.exists() or list(out.iterdir()) == []
    assert (inputs / "self.png").read_bytes() == self_png


def test_disk_full_then_the_same_command_resumes(inputs, tmp_path, monkeypatch, disk_full):
    _oracle(monkeypatch)
    out = tmp_path / "out"
    argv = ["predict", str(inputs / "good.svs"), "--out", str(out / "n.geojson")]
    argv += ["--summary", str(out / "s.json")]
    full = CliRunner().invoke(cellseg, [*argv, "--no-tissue-mask"])
    assert full.exit_code == 1 and "the same command resumes" in full.stderr
    assert (out / "n.geojson.cellseg-work").is_dir()
    monkeypatch.undo()
    _oracle(monkeypatch)
    again = CliRunner().invoke(cellseg, [*argv, "--no-tissue-mask"])
    assert again.exit_code == 0, again.output
    assert "resuming" in again.stderr and (out / "n.geojson").is_file()
    assert not (out / "n.geojson.cellseg-work").exists()


@pytest.mark.slow  # mounts a tmpfs and fills it: a few seconds
def test_a_real_full_disk_gives_one_line(inputs, tmp_path, monkeypatch):
    """The issue's case: a small tmpfs fills up (skipped where mounting is not allowed)."""
    _oracle(monkeypatch)
    folder = tmp_path / "small"
    folder.mkdir()
    if not _mount(folder, "size=256k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        centres = [(y, x) for y in range(15, 600, 24) for x in range(15, 600, 24)]
        big, _ = disc_image(600, 600, centres)  # ~600 nuclei: more than 256 kB of outputs
        slide = make_pyramid_tiff(tmp_path / "big.svs", big, 0.5, levels=1)
        argv = ["predict", str(slide), "--out-dir", str(folder / "res"), "--no-tissue-mask"]
        result = CliRunner().invoke(cellseg, argv)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1, lines
        assert "no space left on device" in lines[0] and "resumes" in lines[0]
        assert not (folder / "res" / "big.geojson").exists()
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
