"""Zero-shot editing over every registered unit: kept codes, all-keep, all-generate, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import tiny_model, tokenizer_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from varkit.base import PredictionUnit, Sampler
from varkit.errors import PluginError, VarkitError
from varkit.generation import box_mask, edit_codes, full_mask, generate_codes
from varkit.generation.editing import as_edit_mask, keep_positions, latent_keep
from varkit.generation.loop import decode_images
from varkit.pipeline import Pipeline
from varkit.plugins import registry
from varkit_plugins.units.token import NextToken

UNITS = [entry.name for entry in registry() if entry.kind == "unit"]
NUM_CLASSES = 4
#: The quickstart test's images keep their shape this far from the border, so the
#: centre box covers it; what is edited, and the floors it must reach.
MARGIN, KEEP_UNTIL, INPAINT_FLOOR, CLASS_EDIT_FLOOR = 6, 2, 0.40, 0.35
PROPERTY = settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _setup(name, seed=0):
    torch.manual_seed(seed)
    tokenizer = tokenizer_for(name).eval()
    model = tiny_model(name, tokenizer, num_classes=NUM_CLASSES).eval()
    return model, tokenizer


def _sampler(name="topk_topp", **options):
    cls = registry().get("sampler", name)
    return cls(cls.Config(**options))


def _images(tokenizer, b, seed):
    h, w = tokenizer.schedule[-1]
    d = tokenizer.downsample
    return torch.rand(b, 3, h * d, w * d, generator=torch.Generator().manual_seed(seed))


def _seq(model, codes):
    return model.unit.targets(codes)  # (b, l) in sequence order


@pytest.mark.parametrize("name", UNITS)
@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), cfg=st.sampled_from([0.0, 1.5]))
def test_kept_codes_are_the_images_codes(name, seed, b, cfg):
    model, tokenizer = _setup(name)
    g = torch.Generator().manual_seed(seed)
    grid = tokenizer.schedule[-1]
    mask = (torch.rand(b, *grid, generator=g) < 0.5).float()  # 1: regenerate
    labels = torch.randint(0, NUM_CLASSES + 1, (b,), generator=g)
    edited = edit_codes(
        model,
        tokenizer,
        _sampler(cfg=cfg, top_k=0, top_p=0.0),
        _images(tokenizer, b, seed),
        mask,
        labels,
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        encoded = tokenizer.encode(_images(tokenizer, b, seed) * 2 - 1)
    assert all(torch.equal(a, c) for a, c in zip(edited.known, encoded))
    got, known = _seq(model, edited.codes), _seq(model, edited.known)
    assert edited.keep.shape == got.shape and edited.keep.dtype == torch.bool
    assert torch.equal(got[edited.keep], known[edited.keep])
    # The finest scale's (or the grid's) kept positions are exactly the mask's black cells.
    finest = model.unit.keep_positions(1.0 - mask)
    assert torch.equal(finest, edited.keep)
    torch.testing.assert_close(edited.f_hat, tokenizer.codes_to_features(edited.codes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", UNITS)
@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3))
def test_all_keep_returns_the_images_codes(name, seed, b):
    model, tokenizer = _setup(name)
    images = _images(tokenizer, b, seed)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=torch.Generator().manual_seed(seed))
    keep_everything = torch.zeros(tokenizer.schedule[-1])
    sampler = _sampler(cfg=1.5, top_k=4, top_p=0.9)
    edited = edit_codes(
        model,
        tokenizer,
        sampler,
        images,
        keep_everything,
        labels,
        generator=torch.Generator().manual_seed(seed),
    )
    assert edited.keep.all()
    assert all(torch.equal(c, k) for c, k in zip(edited.codes, edited.known))
    with torch.no_grad():
        reconstruction = ((tokenizer.decode(edited.known) + 1) / 2).clamp(0, 1)
        decoded = decode_images(tokenizer, edited.f_hat)
    torch.testing.assert_close(decoded, reconstruction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", UNITS)
@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), smooth=st.booleans())
def test_all_generate_equals_plain_generation(name, seed, b, smooth):
    model, tokenizer = _setup(name)
    sampler = _sampler("gumbel" if smooth else "topk_topp", cfg=1.5, top_k=6, top_p=0.9)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=torch.Generator().manual_seed(seed))
    edited = edit_codes(
        model,
        tokenizer,
        sampler,
        _images(tokenizer, b, seed),
        full_mask(tokenizer.schedule[-1]),
        labels,
        generator=torch.Generator().manual_seed(seed),
    )
    plain, f_hat = generate_codes(
        model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(seed)
    )
    assert not edited.keep.any()
    assert all(torch.equal(a, p) for a, p in zip(edited.codes, plain))
    torch.testing.assert_close(edited.f_hat, f_hat, rtol=0, atol=0)


class ShiftedSoft(Sampler):
    """Greedy codes; soft weights one-hot on code + 1 (so a replaced embedding shows)."""

    name = "shifted_soft"

    def sample(self, logits, *, step, num_steps, generator):
        return logits.argmax(-1)

    def soft_weights(self, logits, *, step, num_steps, generator):
        vocab = logits.shape[-1]
        return F.one_hot((logits.argmax(-1) + 1) % vocab, vocab).float()


@pytest.mark.parametrize("name", UNITS)
def test_kept_positions_feed_the_images_embeddings_even_with_soft_weights(name, monkeypatch):
    model, tokenizer = _setup(name)
    fed = []
    step_fn = model.forward_step

    def spy(inputs, labels, cache, step, **kwargs):
        fed.append(None if inputs is None else inputs.clone())
        return step_fn(inputs, labels, cache, step, **kwargs)

    monkeypatch.setattr(model, "forward_step", spy)
    edited = edit_codes(
        model,
        tokenizer,
        ShiftedSoft(),
        _images(tokenizer, 2, 0),
        torch.zeros(tokenizer.schedule[-1]),
        torch.tensor([0, 1]),
        generator=torch.Generator(),
    )
    monkeypatch.undo()
    inputs = torch.cat([x for x in fed if x is not None], dim=1)
    with torch.no_grad():
        expected = model.unit.teacher_forcing(edited.known, tokenizer)
    torch.testing.assert_close(inputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", UNITS)
def test_keep_until_step_keeps_the_first_steps_whole(name):
    model, tokenizer = _setup(name)
    steps = len(model.unit.step_lengths)
    k = max(1, steps // 2)
    edited = edit_codes(
        model,
        tokenizer,
        _sampler(cfg=1.5, top_k=0, top_p=0.0),
        _images(tokenizer, 3, 1),
        full_mask(tokenizer.schedule[-1]),
        torch.tensor([0, 1, 2]),
        generator=torch.Generator().manual_seed(0),
        keep_until_step=k,
    )
    split = model.step_starts[k]
    assert edited.keep[:, :split].all() and not edited.keep[:, split:].any()
    got, known = _seq(model, edited.codes), _seq(model, edited.known)
    assert torch.equal(got[:, :split], known[:, :split])
    assert not torch.equal(got[:, split:], known[:, split:]), "the later steps are generated"
    with pytest.raises(VarkitError, match="keep_until_step"):
        keep_positions(model, tokenizer, torch.ones(1, *tokenizer.schedule[-1]), keep_until_step=steps + 1)


def test_known_codes_and_keep_are_checked():
    model, tokenizer = _setup("scale")
    known = [torch.zeros(2, h, w, dtype=torch.long) for h, w in tokenizer.schedule]
    keep = torch.ones(2, model.unit.seq_len, dtype=torch.bool)

    def run(**kwargs):
        generate_codes(
            model, tokenizer, _sampler(), torch.tensor([0, 1]), generator=torch.Generator(), **kwargs
        )

    with pytest.raises(VarkitError, match="needs both"):
        run(known=known)
    with pytest.raises(VarkitError, match=r"keep must be a \(2, 21\) bool tensor"):
        run(known=known, keep=keep.float())
    with pytest.raises(VarkitError, match="known codes have shapes"):
        run(known=known[:-1], keep=keep)
    run(known=known, keep=keep)


# ---------------------------------------------------------------------- mask arithmetic


def test_scale_unit_follows_vars_rule():
    """Bilinear to each scale, > 0.5; the 1×1 scale whole when anything is kept."""
    model, tokenizer = _setup("scale")
    unit = model.unit
    keep = torch.zeros(2, 4, 4)
    keep[0, :2] = 1.0  # top half kept; row 1: nothing kept
    positions = unit.keep_positions(keep)
    expected = []
    for h, w in tokenizer.schedule:
        resized = F.interpolate(keep[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5
        if h * w <= 3:
            resized = torch.tensor([True, False])[:, None, None].expand(2, h, w)
        expected.append(resized.flatten(1))
    assert torch.equal(positions, torch.cat(expected, 1))
    assert positions[0, 0] and not positions[1].any()
    assert unit.keep_positions(torch.ones(1, 4, 4)).all()


@pytest.mark.parametrize("options", [{}, {"k": 2}])
def test_cell_units_keep_in_their_raster_order(options):
    name = "patch" if options else "token"
    tokenizer = tokenizer_for(name)
    cls = registry().get("unit", name)
    unit = cls(cls.Config(**options), tokenizer=tokenizer, width=16)
    keep = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    # The mask is laid out like the codes: positions follow targets().
    assert torch.equal(unit.keep_positions(keep), unit.targets([keep > 0.5]))


def test_pixel_masks_average_over_each_latent_position():
    _, tokenizer = _setup("token")  # 4 px per position, a 4×4 grid, 16 px images
    pixels = torch.zeros(1, 16, 16)
    pixels[0, :4, :4] = 1.0  # position (0, 0) entirely
    pixels[0, 4:6, :4] = 1.0  # half of position (1, 0)
    keep = latent_keep(pixels, tokenizer)
    assert keep[0, 0, 0] == 0 and keep[0, 1, 0] == 0.5 and keep[0, 3, 3] == 1
    grid_mask = box_mask((0.0, 0.0, 0.25, 0.25), (4, 4))
    pixel_mask = box_mask((0.0, 0.0, 0.25, 0.25), (16, 16))
    assert torch.equal(latent_keep(grid_mask[None], tokenizer), latent_keep(pixel_mask[None], tokenizer))


def test_box_masks():
    inside = box_mask((0.25, 0.5, 0.75, 1.0), (8, 8))
    assert inside.sum() == 4 * 4 and inside[2:6, 4:].all()
    assert torch.equal(box_mask((0.25, 0.5, 0.75, 1.0), (8, 8), outpaint=True), 1 - inside)
    for bad in [(0.5, 0, 0.5, 1), (0, 0, 1.2, 1), (0, 0, 1), "centre", (0.1, 0.1, 0.12, 0.12)]:
        with pytest.raises(VarkitError, match="box"):
            box_mask(bad, (8, 8))


def test_mask_sizes_and_values_are_checked():
    _, tokenizer = _setup("scale")
    assert as_edit_mask(torch.ones(16, 16), batch=3, tokenizer=tokenizer).shape == (3, 16, 16)
    assert as_edit_mask(torch.ones(2, 1, 4, 4), batch=2, tokenizer=tokenizer).shape == (2, 4, 4)
    assert as_edit_mask(Image.new("L", (16, 16), 255), batch=1, tokenizer=tokenizer).min() == 1
    with pytest.raises(
        VarkitError, match=r"mask is 8x8 but must have the image's size 16x16 or the code grid's 4x4"
    ):
        as_edit_mask(torch.ones(8, 8), batch=1, tokenizer=tokenizer)
    with pytest.raises(VarkitError, match="2 masks for 3 images"):
        as_edit_mask(torch.ones(2, 4, 4), batch=3, tokenizer=tokenizer)
    with pytest.raises(VarkitError, match=r"\[0, 1\]"):
        as_edit_mask(torch.full((4, 4), 255.0), batch=1, tokenizer=tokenizer)


class NoEdit(NextToken):
    """A unit that does not map masks onto its positions."""

    name = "noedit"
    keep_positions = PredictionUnit.keep_positions


def test_a_unit_that_cannot_edit_says_so():
    tokenizer = tokenizer_for("token")
    unit = NoEdit(NoEdit.Config(), tokenizer=tokenizer, width=32)
    model = tiny_model(unit, tokenizer, num_classes=NUM_CLASSES)
    with pytest.raises(PluginError, match="unit 'noedit' cannot edit images"):
        edit_codes(
            model,
            tokenizer,
            _sampler(),
            _images(tokenizer, 1, 0),
            torch.ones(4, 4),
            torch.tensor([0]),
            generator=torch.Generator(),
        )


# ------------------------------------------------------------------------- the pipeline


def test_pipeline_edit_inpaint_outpaint_change_class():
    model, tokenizer = _setup("scale")
    pipe = Pipeline(tokenizer, model, sampler=_sampler(cfg=1.5, top_k=4, top_p=0.9))
    images = _images(tokenizer, 2, 3)
    pil = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    out = pipe.inpaint(pil, (0.25, 0.25, 0.75, 0.75), seed=1)
    assert out.shape == (1, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    a = pipe.outpaint(images, (0.25, 0.25, 0.75, 0.75), labels=2, seed=1)
    b = pipe.outpaint(images, (0.25, 0.25, 0.75, 0.75), labels=[2, 2], seed=1)
    assert torch.equal(a, b)
    assert pipe.change_class(images, [1, 3], keep_until_step=1, seed=0).shape == (2, 3, 16, 16)
    with pytest.raises(VarkitError, match=r"class 9 is outside 0\.\.3"):
        pipe.edit(images, torch.ones(4, 4), labels=9)
    with pytest.raises(VarkitError, match="2 labels for 1 images"):
        pipe.edit(images[:1], torch.ones(4, 4), labels=[0, 1])
    with pytest.raises(
        VarkitError, match="the images are 8x8 px but this model's tokenizer works on 16x16 px"
    ):
        pipe.edit(torch.rand(1, 3, 8, 8), torch.ones(4, 4))


# ------------------------------------------------------------------ the trained quickstart


def _shape(label: int, seed: int, render, classify) -> torch.Tensor:
    """A synthetic image ``(3, 32, 32)`` in [0, 1] of ``label`` that the synthetic
    classifier reads as ``label`` (the first of seeds ``seed``, ``seed + 1000``, ...)."""
    import numpy as np

    while True:
        image = torch.from_numpy(render(label, 32, np.random.default_rng(seed), margin=MARGIN))
        image = image.permute(2, 0, 1).float() / 255
        if int(classify(image[None])[0]) == label:
            return image
        seed += 1000


@pytest.mark.slow
def test_editing_the_quickstart_model(quickstart_run, tmp_path):
    """Inpainting keeps the image's codes around the box and the class of the shape;
    class editing turns images into the new class. The thresholds sit below the
    numbers recorded in docs/editing.md."""
    import varkit
    from varkit.cli import main
    from varkit.data.synthetic import classify, render

    pipe = varkit.load(quickstart_run)
    classes = torch.arange(10).repeat_interleave(4)
    images = torch.stack([_shape(int(c), 100 + i, render, classify) for i, c in enumerate(classes)])

    def follows(f_hat, labels):
        return float((classify(decode_images(pipe.tokenizer, f_hat)) == labels).float().mean())

    centre = box_mask((0.25, 0.25, 0.75, 0.75), (32, 32))
    inpainted = edit_codes(
        pipe.model,
        pipe.tokenizer,
        pipe.sampler,
        images,
        centre,
        classes,
        generator=torch.Generator().manual_seed(0),
    )
    kept = inpainted.keep
    assert torch.equal(_seq(pipe.model, inpainted.codes)[kept], _seq(pipe.model, inpainted.known)[kept])
    assert follows(inpainted.f_hat, classes) >= INPAINT_FLOOR

    target = (classes + 5) % 10
    redrawn = edit_codes(
        pipe.model,
        pipe.tokenizer,
        pipe.sampler,
        images,
        full_mask((32, 32)),
        target,
        generator=torch.Generator().manual_seed(0),
        keep_until_step=KEEP_UNTIL,
    )
    assert follows(redrawn.f_hat, target) >= CLASS_EDIT_FLOOR

    # The command line does the same from files (written outside the shared run).
    Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(
        tmp_path / "in.png"
    )
    out = tmp_path / "edit.png"
    argv = ["edit", str(quickstart_run), "--image", str(tmp_path / "in.png"), "--box", "0,0,1,1", "--class", "5",
            "--keep-until-step", str(KEEP_UNTIL), "--seeds", "0,1", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "edit-0-seed1.png").is_file() and (tmp_path / "edit-grid.png").is_file()
