"""Tests of head gates and captum head attribution (probe.attribution)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from probe.attribution import (
    HeadGates,
    ablation_check,
    attribute_heads,
    gateable_modules,
    head_gates,
    imagenet_labels,
    random_head_sets,
    unsupported_reason,
    ranking_from,
)
from probe.errors import ProbeError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HEADS, DEPTH, DIM = 4, 2, 32
HEAD_DIM = DIM // HEADS


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    m = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=3, **kw
    )
    # timm's init is tiny (std 0.02): scale up so every head visibly moves the logits.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m.eval()


def zero_head_columns(model: VisionTransformer, heads: list[tuple[int, int]]) -> VisionTransformer:
    """Weight surgery, independent of the gates: zero the W_O columns of the given heads."""
    with torch.no_grad():
        for layer, h in heads:
            model.blocks[layer].attn.proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0.0
    return model


def images(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


ALL_HEADS = [(layer, h) for layer in range(DEPTH) for h in range(HEADS)]


@pytest.mark.parametrize("fused", [True, False])
def test_all_gates_one_leave_logits_unchanged_and_hooks_are_removed(fused):
    m = tiny_vit()
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    x = images()
    with torch.no_grad():
        ref = m(x)
        with head_gates(m) as gates:
            gates.set(torch.ones(gates.num_features))
            same = m(x)
            gates.set(torch.ones(x.shape[0], gates.num_features))
            same_batch = m(x)
        after = m(x)
    assert torch.equal(same, ref)
    assert torch.equal(same_batch, ref)
    assert torch.equal(after, ref)
    assert all(not blk.attn.proj._forward_pre_hooks for blk in m.blocks)


@pytest.mark.parametrize("scale_attn_norm", [False, True])
def test_gate_zero_equals_zeroing_the_heads_output_projection_columns(scale_attn_norm):
    # With scale_attn_norm the module has a LayerNorm before proj: gating after it is still
    # exactly "remove the head's contribution".
    x = images()
    off = [(0, 1), (1, 3)]
    m = tiny_vit(scale_attn_norm=scale_attn_norm)
    with torch.no_grad():
        want = zero_head_columns(tiny_vit(scale_attn_norm=scale_attn_norm), off)(x)
        with HeadGates(m) as gates:
            g = torch.ones(gates.num_features)
            for f in off:
                g[gates.features.index(f)] = 0.0
            gates.set(g)
            got = m(x)
    assert not torch.allclose(want, m(x), atol=1e-3)  # the surgery does change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_per_sample_gates_match_running_each_sample_alone():
    m = tiny_vit()
    x = images(3)
    with torch.no_grad(), HeadGates(m) as gates:
        g = torch.rand(3, gates.num_features, generator=torch.Generator().manual_seed(2))
        gates.set(g)
        batched = m(x)
        single = []
        for i in range(3):
            gates.set(g[i])
            single.append(m(x[i : i + 1]))
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-5, rtol=1e-5)


def test_gates_select_layers_and_report_features():
    m = tiny_vit()
    assert [n for n, _ in gateable_modules(m)] == ["blocks.0.attn", "blocks.1.attn"]
    with HeadGates(m, layers=[1]) as gates:
        assert gates.features == [(1, h) for h in range(HEADS)]
        assert len(m.blocks[0].attn.proj._forward_pre_hooks) == 0
        assert len(m.blocks[1].attn.proj._forward_pre_hooks) == 1
    # By module name, numbered as the caller says (e.g. the pipeline's layer numbers).
    with HeadGates(m, layers={7: "blocks.1.attn"}) as gates:
        assert gates.features == [(7, h) for h in range(HEADS)]
        assert gates.modules == [m.blocks[1].attn]


def test_bad_input_raises_probe_error():
    m = tiny_vit()
    with pytest.raises(ProbeError, match="no attention module"):
        HeadGates(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ProbeError, match="layers"):
        HeadGates(m, layers=[2])
    with HeadGates(m) as gates, pytest.raises(ProbeError, match="num_features"):
        gates.set(torch.ones(HEADS))
    with HeadGates(m) as gates, pytest.raises(ProbeError, match="does not fit a batch"):
        gates.set(torch.ones(2, gates.num_features))
        m(images(3))
    with pytest.raises(ProbeError, match="unknown attribution method"):
        attribute_heads(m, images(), methods=["shap"])
    with pytest.raises(ProbeError, match="images must be"):
        attribute_heads(m, torch.zeros(3, 32, 32))
    with pytest.raises(ProbeError, match="targets must lie"):
        attribute_heads(m, images(2), targets=[0, 7], methods=["ablation"])
    with pytest.raises(ProbeError, match="got 3 labels for 2"):
        ablation_check(m, images(2), ALL_HEADS, k=1, labels=[0, 1, 2])
    with pytest.raises(ProbeError, match="has no head gate"):
        HeadGates(m, layers={0: "blocks.0.mlp"})
    with pytest.raises(ProbeError, match="not in the model"):
        HeadGates(m, layers={0: "blocks.7.attn"})
    assert "has no head gate" in unsupported_reason(m, {0: "blocks.0.mlp"})
    assert unsupported_reason(m, {0: "blocks.0.attn"}) is None
    assert all(not blk.attn.proj._forward_pre_hooks for blk in m.blocks)
    with pytest.raises(ProbeError, match="k must be"):
        ablation_check(m, images(2), ALL_HEADS, k=0)
    with pytest.raises(ProbeError, match="does not have"):
        ablation_check(m, images(2), [(5, 0)], k=1)


PLANTED = (1, 2)  # (layer, head) whose output alone reaches the logits


def planted_vit() -> VisionTransformer:
    """A tiny ViT where only head PLANTED writes to the residual stream.

    Every other head's output-projection columns, every MLP output (fc2 weight and bias)
    and every attention proj bias are zero: the class token the classifier reads is
    ``cls + pos[0] + W_O^planted z^planted`` (then the final LayerNorm and the linear head).
    """
    m = tiny_vit(seed=3)
    with torch.no_grad():
        for blk in m.blocks:
            blk.mlp.fc2.weight.zero_()
            blk.mlp.fc2.bias.zero_()
            blk.attn.proj.bias.zero_()
    return zero_head_columns(m, [f for f in ALL_HEADS if f != PLANTED])


def test_planted_head_gets_all_importance_under_both_methods():
    m = planted_vit()
    x = images(6)
    r = attribute_heads(m, x, n_steps=32, batch_size=4)
    h = r.heads.set_index(["layer", "head"])
    assert list(h.index) == ALL_HEADS
    # Independent oracles by weight surgery: the target logit with the planted head removed,
    # and with every head removed (the IG baseline).
    with torch.no_grad():
        t = r.targets[:, None]
        full = m(x).gather(1, t)[:, 0]
        without = zero_head_columns(planted_vit(), [PLANTED])(x).gather(1, t)[:, 0]
    assert torch.equal(r.targets, m(x).argmax(-1))
    expected = float((full - without).mean())
    assert expected > 0.2  # the planted head really raises the target logit (on average)
    others = h.drop(index=[PLANTED])
    for method in ("ig", "ablation"):
        col = f"importance_{method}"
        assert (others[col].abs() < 1e-6).all(), others[col]
        # Ablation: f(1) - f(head off); IG: completeness f(1) - f(0) with only one
        # head able to contribute, so both equal the surgery difference.
        assert h.loc[PLANTED, col] == pytest.approx(expected, rel=1e-3, abs=1e-4)
        assert ranking_from(r.heads, col)[0] == PLANTED
    assert r.info["ig_max_abs_convergence_delta"] < 1e-3


def test_attribution_on_selected_layers_only():
    m = planted_vit()
    x = images(3)
    full = attribute_heads(m, x, methods=["ablation"]).heads.set_index(["layer", "head"])
    r = attribute_heads(m, x, methods=["ablation"], layers=[1])
    assert r.info["layers"] == [1]
    sub = r.heads.set_index(["layer", "head"])
    assert list(sub.index) == [(1, h) for h in range(HEADS)]
    # Ablation of one head does not depend on which other heads carry a gate.
    torch.testing.assert_close(
        torch.tensor(sub["importance_ablation"].to_numpy()),
        torch.tensor(full.loc[sub.index, "importance_ablation"].to_numpy()),
    )


def test_given_targets_set_the_attributed_logit():
    m = planted_vit()
    x = images(4)
    labels = torch.tensor([0, 1, 2, 0])
    r = attribute_heads(m, x, targets=labels, methods=["ablation"])
    assert torch.equal(r.targets, labels)
    with torch.no_grad():
        full = m(x).gather(1, labels[:, None])[:, 0]
        without = zero_head_columns(planted_vit(), [PLANTED])(x).gather(1, labels[:, None])[:, 0]
    h = r.heads.set_index(["layer", "head"])
    assert h.loc[PLANTED, "importance_ablation"] == pytest.approx(float((full - without).mean()), rel=1e-4)
    se = float((full - without).std() / 2)  # sd / sqrt(4)
    assert h.loc[PLANTED, "importance_ablation_se"] == pytest.approx(se, rel=1e-3)
    assert "ig" not in "".join(r.heads.columns)


def test_ablation_check_on_planted_model_matches_surgery():
    m = planted_vit()
    x = images(6)
    ranking = [PLANTED] + [f for f in ALL_HEADS if f != PLANTED]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    c = ablation_check(m, x, ranking, k=1, n_random=6, seed=0, targets=labels, labels=labels)
    with torch.no_grad():
        full = m(x)
        without = zero_head_columns(planted_vit(), [PLANTED])(x)
    t = labels[:, None]
    assert c.top_heads == [PLANTED]
    assert c.top_drop == pytest.approx(float((full - without).gather(1, t).mean()), rel=1e-4)
    assert c.top_agreement == pytest.approx(float((without.argmax(-1) == full.argmax(-1)).double().mean()))
    assert c.accuracy == pytest.approx(float((full.argmax(-1) == labels).double().mean()))
    assert c.top_accuracy == pytest.approx(float((without.argmax(-1) == labels).double().mean()))
    # A random single head is the planted one or a head that cannot matter.
    for heads, drop, agree in zip(c.random_heads, c.random_drops, c.random_agreement):
        assert len(heads) == 1
        if heads != [PLANTED]:
            assert drop == 0.0 and agree == 1.0
        else:
            assert drop == pytest.approx(c.top_drop)
    df = c.to_frame()
    assert list(df.columns) == ["condition", "k", "logit_drop", "top1_agreement", "accuracy"]
    assert len(df) == 7
    # Same seed, same draws; default target = predicted class, labels only for accuracy.
    again = ablation_check(m, x, ranking, k=1, n_random=6, seed=0, labels=labels)
    assert again.random_heads == c.random_heads
    pred = full.argmax(-1, keepdim=True)
    assert again.top_drop == pytest.approx(float((full - without).gather(1, pred).mean()), rel=1e-4)
    assert again.accuracy == pytest.approx(c.accuracy)


def test_random_head_sets_draw_distinct_heads_uniformly():
    draws = random_head_sets(ALL_HEADS, k=3, n=2000, seed=1)
    counts = pd.Series([f for heads in draws for f in heads]).value_counts()
    assert all(len(set(heads)) == 3 and set(heads) <= set(ALL_HEADS) for heads in draws)
    assert len(counts) == len(ALL_HEADS)
    # Each head appears with probability 3/8 per draw: 750 expected, sd ~21.7.
    assert counts.between(750 - 90, 750 + 90).all()
    # Pairs are uniform too (not e.g. always consecutive heads): P(pair) = 3*2/(8*7).
    pairs = pd.Series([(a, b) for heads in draws for i, a in enumerate(heads) for b in heads[i + 1 :]])
    assert pairs.nunique() == 28
    assert pairs.value_counts().between(214 - 70, 214 + 70).all()


def test_imagenet_labels_from_file_names():
    got = imagenet_labels(["a/n01440764_tench.JPEG", "n01443537_goldfish.JPEG", "n15075141_toilet_tissue.JPEG"])
    assert got.tolist() == [0, 1, 999]
    with pytest.raises(ProbeError, match="wnid"):
        imagenet_labels(["cat.jpg"])


@pytest.mark.slow
def test_deit_tiny_top_heads_matter_more_than_random_heads():
    weights = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
    photos = sorted((SHARED / "imagenet-sample").glob("*.JPEG"))
    if not weights.is_file() or len(photos) < 12:
        pytest.skip(f"needs DeiT-Tiny weights and ImageNet photos under {SHARED}")
    import timm
    from PIL import Image
    from safetensors.torch import load_file

    m = timm.create_model("deit_tiny_patch16_224")
    m.load_state_dict(load_file(str(weights)), strict=True)
    m.eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
    # Rank on 6 photos, check on 6 others (no in-sample advantage); spread over classes.
    chosen = photos[:: len(photos) // 12][:12]
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in chosen])
    labels = imagenet_labels(chosen)
    r = attribute_heads(m, x[:6], n_steps=8, batch_size=6)
    assert len(r.heads) == 12 * 3
    for col in ("importance_ig", "importance_ablation"):
        c = ablation_check(m, x[6:], r.heads, k=6, column=col, n_random=8, seed=0, labels=labels[6:])
        assert c.accuracy is not None
        assert c.top_drop > c.random_drops.max(), c.summary()


def test_add_head_attribution_joins_the_pipeline_tables_and_renders_a_section(tmp_path):
    from probe.pipeline import analyze
    from probe.report.section_attribution import attribution_section

    from probe.attribution import add_head_attribution

    m = planted_vit()
    res = analyze(m, None, conv_test=False, n_bootstrap=0, attribution="none",
                  data_overrides={"input_size": (3, 32, 32)})
    n_cols = len(res.heads.columns)
    x = images(4)
    add_head_attribution(res, m, x, methods=("ig", "ablation"), k=1, n_random=3, n_steps=32)
    # The join on (layer, head) carries the same numbers as a direct call.
    direct = attribute_heads(m, x, n_steps=32).heads.set_index(["layer", "head"])
    joined = res.heads.set_index(["layer", "head"])
    assert len(res.heads.columns) == n_cols + 4
    for col in ("importance_ig", "importance_ablation", "importance_ablation_se"):
        torch.testing.assert_close(
            torch.tensor(joined.loc[direct.index, col].to_numpy()), torch.tensor(direct[col].to_numpy())
        )
    att = res.extras["attribution"]
    assert set(att["checks"]) == {"ig", "ablation"} and att["k"] == 1
    assert att["checks"]["ig"].top_heads == [PLANTED]
    assert set(att["correlation"]["geometry"]) >= {"mean_distance_px", "entropy_nats"}
    assert att["reading"][-1].startswith("Caveat")
    sec = attribution_section(res.heads, att)
    assert sec["title"].startswith("Which heads matter")
    for piece in ("predicted class", "Integrated gradients", "Spearman", "in-sample", "L1H2", "<img"):
        assert piece in sec["html"], piece
    res.extras["sections"] = [sec]
    report = res.write_report(tmp_path).read_text()
    assert "Which heads matter" in report and "importance_ig" in report


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_integrated_gradients_work_under_no_grad_and_inference_mode(context):
    m = planted_vit()
    want = attribute_heads(m, images(2), methods=["ig"]).heads["importance_ig"]
    with context():
        got = attribute_heads(m, images(2), methods=["ig"]).heads["importance_ig"]
    pd.testing.assert_series_equal(got, want)
