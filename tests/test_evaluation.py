"""Co-segmentation / co-localization metrics, dataset readers and ``dffkit eval`` (issue 7)."""
import json

import numpy as np
import pytest
from PIL import Image

from dffkit import cli
from dffkit.deep_feature_factorization import dff
from dffkit.evaluation import (BoxSample, CosegSample, box_iou, choose_concept, corloc, evaluate_coloc,
                               evaluate_coseg, jaccard, load_mask, precision, read_icoseg, read_voc,
                               read_voc_annotation)

try:
    from dffkit.features import FeatureExtractor  # noqa: F401
    HAVE_EXTRACTOR = True
except ImportError:  # pragma: no cover
    HAVE_EXTRACTOR = False

needs_extractor = pytest.mark.skipif(not HAVE_EXTRACTOR, reason="dffkit.features is not importable")


# ---------------------------------------------------------------------------------------------
# metrics against hand-computed cases
# ---------------------------------------------------------------------------------------------

def test_jaccard_and_precision_by_hand():
    gt = np.zeros((4, 5), bool)
    gt[0:2, 0:2] = True                       # 4 pixels
    pred = np.zeros((4, 5), bool)
    pred[1:3, 1:3] = True                     # 4 pixels, 1 shared
    assert jaccard(pred, gt) == pytest.approx(1 / 7)
    # right: 1 shared foreground pixel + 20 - 7 background pixels
    assert precision(pred, gt) == pytest.approx((1 + 13) / 20)
    assert precision(pred, gt, convention="detection") == pytest.approx(1 / 4)
    assert jaccard(gt, gt) == 1.0 and precision(gt, gt) == 1.0
    empty = np.zeros_like(gt)
    assert jaccard(empty, empty) == 1.0 and jaccard(empty, gt) == 0.0
    assert precision(empty, gt, convention="detection") == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        jaccard(gt, gt[:3])
    with pytest.raises(ValueError, match="convention"):
        precision(gt, gt, convention="pixel")


def test_box_iou_and_corloc_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0          # touching, x1 exclusive
    assert box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0             # empty boxes
    gts = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([[0, 0, 4, 4]])]
    preds = [(0, 0, 10, 12),      # IoU 100/120: hit
             (21, 21, 30, 30),    # second box, IoU 81/100: hit
             None]                # no box: miss
    assert corloc(preds, gts) == pytest.approx(2 / 3)
    assert corloc([(5, 0, 15, 10)], [gts[0]], threshold=0.3) == 1.0
    assert corloc([(5, 0, 15, 10)], [gts[0]]) == 0.0
    with pytest.raises(ValueError, match="2 predicted boxes for 1 images"):
        corloc(preds[:2], gts[:1])


# ---------------------------------------------------------------------------------------------
# readers on folders made here
# ---------------------------------------------------------------------------------------------

def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_load_mask_conventions(tmp_path):
    m = np.zeros((6, 8), np.uint8)
    m[2:4, 3:7] = 1
    _save(tmp_path / "ones.png", m)
    _save(tmp_path / "full.png", m * 255)
    _save(tmp_path / "rgb.png", np.repeat((m * 250)[..., None], 3, axis=2))
    for name in ("ones.png", "full.png", "rgb.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), m.astype(bool))
    assert load_mask(tmp_path / "full.png", size=(12, 16)).sum() == m.sum() * 4


def test_read_icoseg_both_layouts(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    # iCoseg's own: <group>/<image>.jpg + <group>/GroundTruth/<image>.png
    a = tmp_path / "a"
    for group in ("bears", "kites"):
        for i in range(2):
            _save(a / group / f"{i}.jpg", img)
            _save(a / group / "GroundTruth" / f"{i}.png", mask)
    _save(a / "kites" / "no_mask.jpg", img)
    groups = read_icoseg(a)
    assert sorted(groups) == ["bears", "kites"]
    assert [s.image.endswith(f"{i}.jpg") for i, s in enumerate(groups["kites"])] == [True, True]
    assert all(isinstance(s, CosegSample) and "GroundTruth" in s.mask for s in groups["bears"])
    assert sorted(read_icoseg(a, groups=["bears"])) == ["bears"]
    # parallel trees: images/<group>/... and ground_truth/<group>/...; masks with a suffix too
    b = tmp_path / "b"
    _save(b / "images" / "cars" / "x.jpg", img)
    _save(b / "ground_truth" / "cars" / "x.png", mask)
    _save(b / "images" / "cars" / "y.jpg", img)
    _save(b / "images" / "cars" / "y_mask.png", mask)
    groups = read_icoseg(b)
    assert list(groups) == ["cars"] and len(groups["cars"]) == 2
    assert groups["cars"][1].mask.endswith("y_mask.png")
    with pytest.raises(ValueError, match="no images with ground-truth masks"):
        read_icoseg(tmp_path / "a" / "bears" / "GroundTruth")
    with pytest.raises(FileNotFoundError):
        read_icoseg(tmp_path / "nothing")


VOC_XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>50</width><height>40</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJ = """<object><name>{cls}</name><difficult>{d}</difficult>
  <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def _voc(root, name, objects):
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    _save(root / "JPEGImages" / f"{name}.jpg", np.zeros((40, 50, 3), np.uint8))
    objs = "".join(VOC_OBJ.format(cls=c, d=d, x0=b[0], y0=b[1], x1=b[2], y1=b[3]) for c, d, b in objects)
    (root / "Annotations" / f"{name}.xml").write_text(VOC_XML.format(name=name, objects=objs))


def test_read_voc(tmp_path):
    _voc(tmp_path, "000001", [("cat", 0, (1, 1, 10, 20)), ("dog", 0, (5, 5, 30, 30)), ("cat", 1, (2, 2, 3, 3))])
    _voc(tmp_path, "000002", [("dog", 1, (1, 1, 50, 40))])
    ann = read_voc_annotation(tmp_path / "Annotations" / "000001.xml")
    assert isinstance(ann, BoxSample) and ann.size == (40, 50)
    np.testing.assert_array_equal(ann.boxes[0], [0, 0, 10, 20])   # 1-based inclusive -> 0-based exclusive
    assert ann.names == ["cat", "dog", "cat"] and ann.difficult == [False, False, True]
    groups = read_voc(tmp_path)
    assert sorted(groups) == ["cat", "dog"]
    assert len(groups["cat"]) == 1 and groups["cat"][0].boxes.shape == (1, 4)   # difficult dropped
    assert len(groups["dog"]) == 1                                               # 000002's only dog is difficult
    assert len(read_voc(tmp_path, skip_difficult=False)["dog"]) == 2
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("000002\n")
    assert list(read_voc(tmp_path, image_set="val", skip_difficult=False)) == ["dog"]
    with pytest.raises(FileNotFoundError, match="Annotations"):
        read_voc(tmp_path / "JPEGImages")
    (tmp_path / "Annotations" / "bad.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="bad.xml"):
        read_voc(tmp_path)


# ---------------------------------------------------------------------------------------------
# evaluation of DFF results
# ---------------------------------------------------------------------------------------------

def _blocks():
    acts = np.zeros((2, 4, 4, 4), np.float32)
    acts[:, :2, :2] = 1.0   # concept "top": rows 0..1 of the feature grid
    acts[:, 2:, 2:] = 1.0
    images = [np.zeros((40, 40, 3), np.uint8)] * 2
    return images, acts


def test_evaluate_coseg_and_coloc_on_known_result(tmp_path):
    images, acts = _blocks()
    result = dff(images, 2, activations=acts)
    gt = np.zeros((40, 40), np.uint8)
    gt[:20] = 255
    _save(tmp_path / "gt.png", gt)
    samples = [CosegSample("a.png", str(tmp_path / "gt.png"), "g")] * 2
    report = evaluate_coseg(samples, result=result)
    top = int(result.labels[0][5, 20])
    assert report["concept"] == top and report["jaccard"] >= 0.9 and report["precision"] >= 0.95
    assert report["per_concept_jaccard"][1 - top] < 0.1
    boxes = [BoxSample("a.png", np.array([[0, 0, 40, 20]]))] * 2
    rep = evaluate_coloc(boxes, result=result)
    assert rep["concept"] == top and rep["corloc"] == 1.0
    assert choose_concept(result, "center") in (0, 1)
    with pytest.raises(ValueError, match="choose must be"):
        choose_concept(result, "best")


@needs_extractor
def test_cli_eval_icoseg_and_voc(tmp_path, capsys):
    from test_dff import coseg_set

    images, masks = coseg_set(n=4, size=64)
    root = tmp_path / "icoseg"
    for i, (im, m) in enumerate(zip(images, masks)):
        _save(root / "stripes" / f"{i}.jpg", im)
        _save(root / "stripes" / "GroundTruth" / f"{i}.png", m.astype(np.uint8) * 255)
    out = tmp_path / "coseg.json"
    assert cli.main(["eval", str(root), "-k", "3", "--out", str(out), "--backend", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "icoseg" and report["groups"][0]["n_images"] == 4
    assert report["mean"]["jaccard"] >= 0.8
    assert "Jaccard" in capsys.readouterr().out

    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    for i, (im, m) in enumerate(zip(images, masks)):
        ys, xs = np.nonzero(m)
        _save(voc / "JPEGImages" / f"{i:06d}.jpg", im)
        obj = VOC_OBJ.format(cls="stripes", d=0, x0=xs.min() + 1, y0=ys.min() + 1, x1=xs.max() + 1, y1=ys.max() + 1)
        (voc / "Annotations" / f"{i:06d}.xml").write_text(VOC_XML.format(name=f"{i:06d}", objects=obj))
    out = tmp_path / "coloc.json"
    assert cli.main(["eval", str(voc), "-k", "3", "--out", str(out), "--backend", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "voc" and report["mean"]["corloc"] >= 0.75
    assert cli.main(["eval", str(tmp_path / "none")]) == 1


def test_per_image_results_choose_a_concept_in_each_image(tmp_path):
    images, acts = _blocks()
    result = dff(images, 2, activations=acts, mode="per_image")
    gt = np.zeros((40, 40), np.uint8)
    gt[:20] = 255
    _save(tmp_path / "gt.png", gt)
    report = evaluate_coseg([CosegSample("a.png", str(tmp_path / "gt.png"), "g")] * 2, result=result)
    assert report["concept"] is None and report["mode"] == "per_image"
    assert [r["concept"] for r in report["per_image"]] == [int(lab[5, 20]) for lab in result.labels]
    assert report["jaccard"] >= 0.9


# ---------------------------------------------------------------------------------------------
# regressions: bad <size>, argument checks, the output file and k checked before the work
# ---------------------------------------------------------------------------------------------

def test_read_voc_names_the_file_with_a_bad_size(tmp_path):
    _voc(tmp_path, "000001", [("cat", 0, (1, 1, 10, 20))])
    xml = tmp_path / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace("<height>40</height>", "<height>x</height>"))
    with pytest.raises(ValueError, match=r"000001\.xml: <size> must hold numbers, got height 'x'"):
        read_voc_annotation(xml)
    with pytest.raises(ValueError, match=r"000001\.xml"):
        read_voc(tmp_path)


def _two_groups(root, sizes=(("big", 2), ("small", 1))):
    """An iCoseg-style folder: group ``name`` with ``n`` images of 32 x 32 and their masks."""
    rng = np.random.default_rng(0)
    for name, n in sizes:
        for i in range(n):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            mask[8:24, 8:24] = 255
            _save(root / name / f"{i}.png", img)
            _save(root / name / "GroundTruth" / f"{i}.png", mask)
    return root


@pytest.mark.parametrize("argv, message", [
    (["--max-images", "0"], "argument --max-images: must be a positive int (images per group), got 0"),
    (["--max-images", "-1"], "argument --max-images: must be a positive int (images per group), got -1"),
    (["--image-size", "0"], "argument --image-size: must be a positive int (pixels), got 0"),
])
def test_cli_eval_refuses_non_positive_counts(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(tmp_path), *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


@needs_extractor
def test_cli_eval_max_images_limits_each_group(tmp_path):
    root = _two_groups(tmp_path / "ds")
    out = tmp_path / "ev.json"
    assert cli.main(["eval", str(root), "-k", "2", "--max-images", "1", "--image-size", "32", "--out", str(out),
                     "--backend", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert [g["n_images"] for g in report["groups"]] == [1, 1] and report["failed"] == []


@needs_extractor
def test_cli_eval_refuses_an_unusable_output_before_the_work(tmp_path, capsys, monkeypatch):
    from dffkit import evaluation

    monkeypatch.setattr(evaluation, "evaluate_coseg", lambda *a, **k: pytest.fail("evaluated in vain"))
    root = _two_groups(tmp_path / "ds")
    (tmp_path / "ev").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "ev", "is a folder: pass a file name"),
                         (tmp_path / "afile" / "ev.json", "which is a file, not a folder")):
        assert cli.main(["eval", str(root), "-k", "2", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"dffkit eval: error: --out {out}" in err and message in err and "Traceback" not in err
    out = tmp_path / "new" / "deeper" / "ev.json"  # missing folders are fine: created
    monkeypatch.setattr(evaluation, "evaluate_coseg", lambda samples, *a, **k: {
        "jaccard": 1.0, "precision": 1.0, "concept": 0, "n_images": len(samples)})
    assert cli.main(["eval", str(root), "-k", "2", "--out", str(out)]) == 0 and out.is_file()


@needs_extractor
def test_cli_eval_checks_k_against_every_group_first(tmp_path, capsys, monkeypatch):
    """At 16 x 16 the filter bank's feature grid is 2 x 2: 8 positions for the group of two
    images, 4 for the group of one; -k 6 fits the first only. Refused before any group runs,
    naming the group and the largest k."""
    from dffkit import evaluation

    root = _two_groups(tmp_path / "ds")
    calls = []
    real = evaluation.evaluate_coseg
    monkeypatch.setattr(evaluation, "evaluate_coseg", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "ev.json"
    base = ["eval", str(root), "--image-size", "16", "--out", str(out), "--backend", "cpu"]
    assert cli.main([*base, "-k", "6"]) == 1
    err = capsys.readouterr().err
    assert "-k 6 is larger than the number of feature positions" in err and "small (1 image: at most 4)" in err
    assert "big" not in err and "pass -k 4 or less" in err
    assert calls == [] and not out.exists()
    assert cli.main([*base, "-k", "6", "--per-image"]) == 1
    assert "big (2 images: at most 4), small (1 image: at most 4)" in capsys.readouterr().err
    assert calls == []
    assert cli.main([*base, "-k", "4"]) == 0 and len(calls) == 2
    # where the sizes are not known up front, the groups that fail are reported, the others kept
    monkeypatch.setattr(evaluation, "_group_positions", lambda *a, **k: None)
    assert cli.main([*base, "-k", "6"]) == 1
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert [g["group"] for g in report["groups"]] == ["big"]
    assert [f["group"] for f in report["failed"]] == ["small"]
    assert "larger than the number of positions" in report["failed"][0]["error"]
    assert "1 of 2 groups failed (small)" in captured.err and "big" in captured.out
