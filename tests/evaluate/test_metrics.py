"""``varkit metrics`` end to end on torch-fidelity's real Inception code (random weights from
a file), and the image sets it reads."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch
from eval_helpers import random_images, write_folder, write_npz
from PIL import Image

from varkit.cli import main
from varkit.errors import EvaluationError
from varkit.evaluate.fid import evaluate_samples
from varkit.evaluate.image_sets import adm_center_crop, open_image_set
from varkit.evaluate.inception import default_weights_path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_shard(path, images, labels=None):
    with tarfile.open(path, "w") as tar:
        for i, img in enumerate(images):
            for ext, data in (
                ("png", _png(img)),
                ("cls", str(i % 4 if labels is None else labels[i]).encode()),
            ):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_image_sets_read_npz_folders_and_shards_alike(tmp_path):
    images = random_images(7)
    sets = [
        open_image_set(write_npz(tmp_path / "a.npz", images)),
        open_image_set(write_folder(tmp_path / "folder", images)),
        open_image_set(write_shard(tmp_path / "s-000000.tar", images)),
    ]
    for image_set in sets:
        assert image_set.resolution == (16, 16) and image_set.count == 7
        read = np.concatenate(list(image_set.batches(3)))
        assert np.array_equal(read, images), image_set.kind
    digests = {s.describe()["pixels_sha256"] for s in sets}
    assert len(digests) == 1  # the digest is of the pixels, whatever the container
    limited = open_image_set(tmp_path / "folder", limit=5)
    assert sum(len(b) for b in limited.batches(2)) == 5 and limited.describe()["limit"] == 5


def test_adm_center_crop():
    image = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (40, 1, 3)))  # 100×40
    out = adm_center_crop(image, 16)
    # halve once (40 >= 32), then bicubic to a short side of 16, then the centre 16×16
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert 40 < out[0, 8, 0] < 60  # the middle of a left-to-right ramp


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    images = random_images(4, seed=1)
    return {
        "npz": write_npz(root / "samples.npz", images),
        "folder": write_folder(root / "same-as-folder", images),
        "other": write_npz(root / "other.npz", random_images(4, seed=2)),
        "big": write_npz(root / "big.npz", random_images(4, size=32)),
    }


def test_metrics_end_to_end_on_the_real_inception(sets, inception_weights, tmp_path, capsys):
    # the same pixels through two readers: FID and sFID 0, precision and recall 1
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(
        capsys, "metrics", sets["npz"], "--ref", sets["folder"], "--inception-weights", inception_weights,
        "--sfid", "--out", report_path, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(report_path.read_text())
    metrics = report["metrics"]
    assert abs(metrics["fid"]) < 1e-6 and abs(metrics["sfid"]) < 1e-6
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["inception_score"] >= 1.0
    assert report["samples"]["pixels_sha256"] == report["reference"]["pixels_sha256"]
    assert report["reference"]["kind"] == "folder" and report["samples"]["images"] == 4
    assert report["evaluator"]["weights_sha256"] and report["evaluator"]["published_weights"] is False
    assert "weights" in report["notes"] and "not the published file" in err
    assert [line.split()[0] for line in out.splitlines()] == ["FID", "sFID", "IS", "precision", "recall"]

    # other images: FID above 0, and the report goes beside the samples
    code, _out, err = run_cli(
        capsys, "metrics", sets["npz"], "--ref", sets["other"], "--inception-weights", inception_weights
    )
    assert code == 0, err
    report = json.loads((sets["npz"].parent / "metrics.json").read_text())
    assert report["metrics"]["fid"] > 1e-3
    assert report["reference"]["path"] == str(sets["other"]) and "sfid" not in report["metrics"]


class PixelNet:
    """A stand-in for the Inception network: features are 4×4 average-pooled pixels
    (48 numbers), logits and spatial features fixed projections of them. The scoring
    logic runs on it in milliseconds; the real network runs in the tests above."""

    batch_size = 4
    device = torch.device("cpu")
    sha256 = "0" * 64
    published = True

    def __init__(self):
        rng = np.random.default_rng(0)
        self.to_logits = rng.standard_normal((48, 10))
        self.to_spatial = rng.standard_normal((48, 6))

    def describe(self):
        return {"network": "pixels"}

    def __call__(self, pixels, *, spatial=False):
        x = pixels.astype(np.float64).reshape(
            len(pixels), 4, pixels.shape[1] // 4, 4, pixels.shape[2] // 4, 3
        )
        pool = x.mean((2, 4)).reshape(len(pixels), -1) / 255
        out = {"pool": pool, "logits": pool @ self.to_logits}
        if spatial:
            out["spatial"] = pool @ self.to_spatial
        return out


def test_adm_statistics_are_used_as_they_are(sets, tmp_path):
    net = PixelNet()
    pool = net(np.concatenate(list(open_image_set(sets["npz"]).batches(8))))["pool"]
    s = np.cov(pool, rowvar=False)
    # reference statistics that are not those of its images: FID follows the statistics
    mu, sigma = pool.mean(0) + 0.1, s + np.eye(48) * 0.5
    ref = write_npz(tmp_path / "VIRTUAL_ref.npz", random_images(4, seed=1), mu=mu, sigma=sigma)
    report = evaluate_samples(open_image_set(sets["npz"]), open_image_set(ref), net)
    w = np.linalg.eigvalsh(s)  # S and S + 0.5 I share eigenvectors
    w[w < 1e-12] = 0  # S has rank 3: its other eigenvalues are 0 (eigh returns them as ±1e-17)
    expected = 48 * 0.01 + 2 * w.sum() + 0.5 * 48 - 2 * np.sqrt(w * (w + 0.5)).sum()
    assert report["metrics"]["fid"] == pytest.approx(expected, rel=1e-9)
    assert report["notes"]["fid_reference"] == "the reference's mu and sigma, as given"
    assert report["metrics"]["precision"] == report["metrics"]["recall"] == 1.0  # its images serve P/R
    assert report["reference"]["statistics"] == ["mu", "sigma"] and report["reference"]["statistics_sha256"]

    # statistics without images: FID, and no precision/recall
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=mu, sigma=sigma)
    report = evaluate_samples(open_image_set(sets["npz"]), open_image_set(stats_only), net, sfid=True)
    assert report["metrics"]["fid"] == pytest.approx(expected, rel=1e-9)
    assert "precision" not in report["metrics"] and "sfid" not in report["metrics"]
    assert "left out" in report["notes"]["precision_recall"] and "left out" in report["notes"]["sfid"]

    # sFID from the reference's mu_s/sigma_s
    spatial = net(np.concatenate(list(open_image_set(sets["npz"]).batches(8))), spatial=True)["spatial"]
    np.savez(stats_only, mu=mu, sigma=sigma, mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    report = evaluate_samples(open_image_set(sets["npz"]), open_image_set(stats_only), net, sfid=True)
    assert abs(report["metrics"]["sfid"]) < 1e-9
    assert report["notes"]["sfid_reference"] == "the reference's mu_s and sigma_s, as given"

    # statistics of another network's size
    np.savez(stats_only, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(EvaluationError, match=r"mu/sigma have shapes \(2048,\)/\(2048, 2048\), not \(48,\)"):
        evaluate_samples(open_image_set(sets["npz"]), open_image_set(stats_only), net)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("big", "holds 32×32 images but the samples"),
        ("no-arr", "has no arr_0 (its arrays: labels)"),
        ("empty", "holds no images"),
        ("missing", "does not exist"),
    ],
)
def test_bad_references_exit_2_with_one_paragraph(sets, inception_weights, tmp_path, capsys, ref, message):
    paths = {
        "big": sets["big"],
        "no-arr": tmp_path / "labels.npz",
        "empty": tmp_path / "empty",
        "missing": tmp_path / "nothing.npz",
    }
    np.savez(paths["no-arr"], labels=np.arange(3))
    paths["empty"].mkdir()
    code, _out, err = run_cli(
        capsys, "metrics", sets["npz"], "--ref", paths[ref], "--inception-weights", inception_weights
    )
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_inception_weights_name_the_file_and_where_it_comes_from(
    sets, tmp_path, monkeypatch, capsys, torch_fidelity
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert default_weights_path() == expected
    code, _out, err = run_cli(capsys, "metrics", sets["npz"], "--ref", sets["other"])
    assert code == 2
    assert str(expected) in err and "https://github.com/toshas/torch-fidelity/releases/download" in err
    assert "--inception-weights" in err and "Traceback" not in err
    # a weights file given but absent
    code, _out, err = run_cli(
        capsys, "metrics", sets["npz"], "--ref", sets["other"], "--inception-weights", tmp_path / "x.pth"
    )
    assert code == 2 and "x.pth does not exist" in err
    # the library's cache is where the weights are found
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"not a checkpoint")
    code, _out, err = run_cli(capsys, "metrics", sets["npz"], "--ref", sets["other"])
    assert code == 2 and "is not a PyTorch checkpoint" in err


def test_weights_of_another_network_are_refused(sets, tmp_path, capsys, torch_fidelity):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    code, _out, err = run_cli(
        capsys, "metrics", sets["npz"], "--ref", sets["other"], "--inception-weights", path
    )
    assert code == 2 and "does not fit torch-fidelity's inception-v3-compat network" in err


@pytest.mark.parametrize(
    ("blocked", "message"),
    [
        ("torch_fidelity", "pip install 'varkit[eval]'"),
        ("torchvision", "because torchvision fails to import"),
    ],
)
def test_a_missing_or_broken_torch_fidelity_says_what_to_install(sets, monkeypatch, capsys, blocked, message):
    for name in [n for n in sys.modules if n.startswith(("torch_fidelity", "torchvision"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now fails
    code, _out, err = run_cli(capsys, "metrics", sets["npz"], "--ref", sets["other"])
    assert code == 2 and message in err and "Traceback" not in err


def test_a_report_path_that_is_a_directory_is_refused_before_any_work(sets, tmp_path, capsys):
    code, _out, err = run_cli(capsys, "metrics", sets["npz"], "--ref", sets["other"], "--out", tmp_path)
    assert code == 2 and "is a directory" in err
    assert not list(tmp_path.glob(".tmp-*"))


def test_image_sets_refuse_what_they_cannot_read(tmp_path):
    write_folder(tmp_path / "mixed", random_images(2))
    Image.fromarray(random_images(1, size=20)[0]).save(tmp_path / "mixed" / "9999.png")
    mixed = open_image_set(tmp_path / "mixed")
    with pytest.raises(EvaluationError, match="image 2 is 20×20 but the set's images are 16×16"):
        list(mixed.batches(8))
    cropped = open_image_set(tmp_path / "mixed", center_crop=16)
    assert sum(len(b) for b in cropped.batches(8)) == 3
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EvaluationError, match=r"neither an \.npz, a folder of images nor a \.tar shard"):
        open_image_set(tmp_path / "notes.txt")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(EvaluationError, match="arr_0 is float32"):
        open_image_set(tmp_path / "floats.npz")
