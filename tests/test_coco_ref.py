"""`distill coco-ref`: the COCO zero-shot protocol's prompts, reference images and statistics from local files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from distill.cli import main
from distill.metrics import Stats
from distill.metrics.coco import centre_crop_resize
from tests.test_metrics_cli import assert_one_line_error, fake_inception, offline  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _coco(tmp, sizes=((40, 30), (30, 50), (64, 64), (33, 20), (20, 33))):
    folder = tmp / "val2014"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (w, h) in enumerate(sizes):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=95)
        images.append({"id": 100 + i, "file_name": name})
        annotations += [{"image_id": 100 + i, "caption": f"image {i}\nfirst caption "},
                        {"image_id": 100 + i, "caption": f"image {i} second caption"}]
    images.append({"id": 999, "file_name": "uncaptioned.jpg"})
    (tmp / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder


def test_coco_reference_prompts_images_and_statistics(offline, fake_inception, capsys):
    folder = _coco(offline)
    out = offline / "coco"
    argv = ["coco-ref", "--captions", offline / "captions.json", "--images", folder, "--out", out, "--n", "4",
            "--resolution", "16", "--seed", "3", "--inception", fake_inception, "--no-progress", "--workers", "0"]
    code = main([str(a) for a in argv])
    assert code == 0, capsys.readouterr().err
    protocol = json.loads((out / "coco_protocol.json").read_text())
    chosen = [int(name[-16:-4]) for name in protocol["files"]]
    assert chosen == list(np.random.default_rng(3).permutation(5)[:4])
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert prompts == [f"image {i} first caption" for i in chosen]  # first caption, whitespace folded
    for index, i in enumerate(chosen):
        saved = np.asarray(Image.open(out / "images" / f"{index:05d}.png"))
        with Image.open(folder / protocol["files"][index]) as original:
            w, h = original.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            expect = np.asarray(original.convert("RGB").crop(box).resize((16, 16), Image.LANCZOS))
        assert saved.shape == (16, 16, 3) and np.array_equal(saved, expect)
    stats = Stats.load(out / "ref_inception.npz")
    assert stats.n == 4 and stats.dim == 2048


@pytest.mark.parametrize("extra, fragment", [
    (["--n", "6"], "more than the 5 captioned images"),
    (["--n", "1"], "--n must be an integer >= 2"),
    (["--resolution", "0"], "--resolution must be an integer >= 16"),
    (["--batch-size", "0"], "--batch-size 0 is out of range: expected a value >= 1"),
    (["--n", "3"], "inception-2015-12-05.pt not found"),  # the weights are looked for before any image is converted
    (["--threads", "0"], "--threads must be an integer >= 1"),  # named as on the command line
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--n", "nan"], "argument --n: invalid int value: 'nan'"),  # argparse's refusal: one line too
    (["--out", "{captions}"], "is a file; expected a folder"),
])
def test_coco_reference_errors_come_first(offline, capsys, extra, fragment):
    folder = _coco(offline)
    extra = [str(offline / "captions.json") if e == "{captions}" else e for e in extra]
    argv = ["coco-ref", "--captions", offline / "captions.json", "--images", folder, "--out", offline / "o", *extra]
    assert_one_line_error(main([str(a) for a in argv]), capsys.readouterr().err, fragment)
    assert not (offline / "o" / "images").exists()


def test_tsv_captions_and_missing_images(offline, capsys):
    folder = _coco(offline)
    (offline / "c.tsv").write_text("COCO_val2014_000000000000.jpg\ta cat\nmissing.jpg\ta dog\n")
    argv = ["coco-ref", "--captions", offline / "c.tsv", "--images", folder, "--out", offline / "o", "--n", "2",
            "--no-stats"]
    assert_one_line_error(main([str(a) for a in argv]), capsys.readouterr().err, "1 of 2 chosen images are not in")
    assert centre_crop_resize(Image.new("L", (30, 10)), 16).size == (16, 16)
