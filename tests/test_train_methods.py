"""Each training method on the real stories260K: step-0 invariance, frozen tensors, chain knots, learning."""

import pytest
import torch

from lora_lens import ConfigError
from lora_lens.train import SparseSettings, TrainConfig, fit, prepare, train
from lora_lens.train.loop import learning_rate

from .tolerances import gamma
from .train_utils import FAST, load_hf, logits, target_weights, token_ids, write_condlora_init, write_cora_init

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def base_logits(stories_path):
    ids = token_ids(512)
    return ids, logits(load_hf(stories_path), ids)


def config(method, **kw):
    return TrainConfig(method=method, **{**FAST, **kw})


@pytest.mark.parametrize("method", ["lora", "cora-frozen", "cora-init", "condlora", "lora-sp", "chain"])
def test_output_unchanged_at_step_0(stories_path, base_logits, method):
    ids, ref = base_logits
    run = prepare(stories_path, config(method, device="cpu"))
    assert len(run.adapted.layers) == 10  # q_proj and v_proj in 5 blocks
    assert torch.equal(logits(run.model, ids), ref)


def test_condlora_official_mode_on_square_targets(stories_path, base_logits):
    ids, ref = base_logits
    run = prepare(stories_path, config("condlora", targets=("q_proj", "o_proj"), condlora_mode="official"))
    assert run.adapted.mode == "official"
    th = run.adapted.thetas["self_attn.q_proj"]
    assert th.theta_A.shape == (8, 64) and th.theta_B.shape == (8, 64)
    assert torch.equal(logits(run.model, ids), ref)
    with pytest.raises(ConfigError, match="square"):
        prepare(stories_path, config("condlora", condlora_mode="official"))  # v_proj is 32x64


def test_condlora_factors_follow_w0(stories_path):
    """A and B are recomputed from each layer's own W0 (general: A = Θ_Aᵀ W0, B = W0 Θ_B), Θ shared."""
    run = prepare(stories_path, config("condlora"))
    layers = run.adapted.layers
    th = run.adapted.thetas["self_attn.v_proj"]
    with torch.no_grad():
        th.theta_B.normal_()
    for path in ("model.layers.0.self_attn.v_proj", "model.layers.3.self_attn.v_proj"):
        W0 = layers[path].base_layer.weight.double()  # (32, 64)
        A, B = layers[path].factors()
        torch.testing.assert_close(A.double(), th.theta_A.double().T @ W0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(B.double(), W0 @ th.theta_B.double(), atol=1e-5, rtol=1e-5)
    assert layers["model.layers.0.self_attn.v_proj"].theta is layers["model.layers.4.self_attn.v_proj"].theta
    # One Θ pair per module type, whatever the depth.
    assert run.parameter_counts()[0] == (64 * 8 + 64 * 8) + (32 * 8 + 64 * 8)


def test_cora_basis_from_base_is_top_singular_subspace(stories_path):
    run = prepare(stories_path, config("cora-init"))
    for path, layer in list(run.adapted.layers.items())[:3]:
        B = layer.lora_B.detach().double()  # (m, r)
        W0 = layer.base_layer.weight.double()
        U = torch.linalg.svd(W0, full_matrices=False)[0][:, :8]
        torch.testing.assert_close(B.T @ B, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(B @ B.T, U @ U.T, atol=1e-4, rtol=0)  # the same subspace
        assert torch.count_nonzero(layer.lora_A) == 0


@pytest.mark.parametrize("method", ["cora-frozen", "cora-init", "condlora"])
def test_init_methods_from_the_base_scale_as_their_init_folder(stories_path, tmp_path, method):
    """One default scaling for the methods with an init folder, s = α/r = 1 (methods.cora.DEFAULT_SCALING):
    the trainer's own start used LoRA's α = 16 at r = 8 (s = 2) while `cora init` / `condlora init` folders
    default to α = r (s = 1), so `init` + `train --init` trained at half the scale of `train` alone."""
    from lora_lens.methods.condlora import condlora_init
    from lora_lens.methods.cora import DEFAULT_SCALING, cora_init

    run = prepare(stories_path, config(method))
    make = condlora_init if method == "condlora" else cora_init
    res = make(stories_path, 8, "q_proj,v_proj", out_dir=tmp_path / "init", device="cpu")
    from_folder = prepare(stories_path, config(method), init=tmp_path / "init")
    assert res.description.alpha / res.description.rank == DEFAULT_SCALING == 1.0
    assert {layer.scaling for layer in run.adapted.layers.values()} == {DEFAULT_SCALING}
    assert {layer.scaling for layer in from_folder.adapted.layers.values()} == {DEFAULT_SCALING}
    assert {layer.scaling for layer in prepare(stories_path, config("lora")).adapted.layers.values()} == {2.0}


def test_cora_frozen_b_is_bit_identical_after_training(stories_path, base_logits, tmp_path):
    ids, ref = base_logits
    basis = write_cora_init(tmp_path / "init", stories_path, rank=4, alpha=8.0, mode="frozen")
    run = prepare(stories_path, config("cora-frozen", weight_decay=0.1), init=tmp_path / "init")
    assert torch.equal(logits(run.model, ids), ref)
    assert run.adapted.rank == 4 and run.parameter_counts()[0] == 5 * 4 * (64 + 64)  # A only
    result = fit(run)
    for path, layer in run.adapted.layers.items():
        assert torch.equal(layer.lora_B.detach(), basis[path])
        assert torch.count_nonzero(layer.lora_A) > 0
    assert result.losses[-1] < result.losses[0]


def test_cora_init_trains_b(stories_path, tmp_path):
    basis = write_cora_init(tmp_path / "init", stories_path, rank=4, mode="init")
    run = prepare(stories_path, config("cora-init"), init=tmp_path / "init")
    fit(run)
    layer = run.adapted.layers["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(layer.lora_B.detach(), basis["model.layers.0.self_attn.q_proj"])


def test_init_disagreements_are_refused(stories_path, tmp_path):
    write_cora_init(tmp_path / "cora", stories_path, rank=4)
    with pytest.raises(ConfigError, match="--rank 8 disagrees"):
        prepare(stories_path, config("cora-frozen", rank=8), init=tmp_path / "cora")
    with pytest.raises(ConfigError, match="'cora' init folder"):
        prepare(stories_path, config("condlora"), init=tmp_path / "cora")
    with pytest.raises(ConfigError, match="takes no --init"):
        prepare(stories_path, config("lora"), init=tmp_path / "cora")


def test_condlora_init_folder_is_used(stories_path, tmp_path):
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (32, 64)}
    theta = write_condlora_init(tmp_path / "init", shapes, rank=4, alpha=8.0)
    run = prepare(stories_path, config("condlora"), init=tmp_path / "init")
    assert run.adapted.rank == 4 and run.adapted.mode == "general"
    for t, (tA, tB) in theta.items():
        assert torch.equal(run.adapted.thetas[t].theta_A.detach(), tA)
        assert torch.equal(run.adapted.thetas[t].theta_B.detach(), tB)
    layer = run.adapted.layers["model.layers.2.self_attn.q_proj"]
    W0 = layer.base_layer.weight.double()
    A, B = layer.factors()
    torch.testing.assert_close(A.double(), theta["self_attn.q_proj"][0].double().T @ W0, atol=1e-5, rtol=1e-5)


def test_lora_sp_masked_entries_bit_identical_with_weight_decay(stories_path):
    run = prepare(stories_path, config("lora-sp", weight_decay=0.5, steps=8))
    masks = run.masks
    before = {n: p.detach().clone() for n, p in masks.params.items()}
    assert set(before) and all(n.endswith(("lora_A", "lora_B")) for n in before)
    result = fit(run)
    moved_A = 0
    for name, p in masks.params.items():
        keep = masks.masks[name]
        assert torch.equal(p.detach()[~keep], before[name][~keep]), name  # frozen: not one bit moved
        changed = p.detach()[keep] != before[name][keep]
        assert changed.float().mean() > 0.9, name  # the free half did train
        if name.endswith("lora_A"):
            moved_A += int(changed.sum())
    assert moved_A > 0
    assert result.allocated_parameters == 8960
    assert result.trainable_parameters == masks.unmasked
    assert 0.4 < result.trainable_parameters / result.allocated_parameters < 0.6


def test_update_masks_with_resampling_and_adam_state():
    """Row masks re-drawn every step: frozen rows never move, nor do their Adam moments and step counts."""
    from lora_lens.train.masked_adamw import MaskedAdamW
    from lora_lens.train.masks import UpdateMasks

    torch.manual_seed(0)
    A = torch.nn.Parameter(torch.randn(6, 5))
    B = torch.nn.Parameter(torch.randn(4, 6))
    masks = UpdateMasks({"x.lora_A": A, "x.lora_B": B}, SparseSettings("row", "both", "step"), seed=3)
    opt = MaskedAdamW([A, B], masks.mask_of, lr=0.1, weight_decay=0.3)
    seen = set()
    for step in range(5):
        if step:
            masks.sample()
        mask_A = masks.masks["x.lora_A"]
        assert bool((mask_A == mask_A[:, :1]).all())  # whole rows
        seen.add(tuple(mask_A[:, 0].tolist()))
        before = {n: p.detach().clone() for n, p in masks.params.items()}
        state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in masks.params.items()}
        ((A.sum(0) ** 2).sum() + (B ** 3).sum()).backward()
        masks.mask_grads()
        opt.step()
        opt.zero_grad()
        for n, p in masks.params.items():
            keep = masks.masks[n]
            assert torch.equal(p.detach()[~keep], before[n][~keep])
            assert bool((p.detach()[keep] != before[n][keep]).all())
            for k, v in state[n].items():  # moments and counts of frozen entries: untouched
                assert torch.equal(opt.state[p][k][~keep], v[~keep])
    assert len(seen) > 1
    with pytest.raises(ConfigError, match="granularity"):
        SparseSettings("block")


def test_masked_adamw_is_adamw_when_nothing_is_masked():
    """Float64, same operations in the same order as torch's single-tensor AdamW: equal to a few ulps."""
    from lora_lens.train.masked_adamw import MaskedAdamW

    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(20)]
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ref = torch.optim.AdamW([a], lr=0.01, weight_decay=0.1, foreach=False)
    ours = MaskedAdamW([b], lambda p: None, lr=0.01, weight_decay=0.1)
    for grad in grads:
        for p, opt in ((a, ref), (b, ours)):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-13, atol=1e-15)


def test_a_re_unfrozen_entry_takes_adams_step_not_three_times_lr():
    """Constant gradients: Adam's bias-corrected step is exactly lr·|g|/(|g|+ε) ≤ lr for every entry, however
    long it was frozen. Before the fix (one global step count, moments of frozen entries zeroed) an entry
    unfrozen after step ~1000 moved lr·(1−β1)/√(1−β2)·√(1−β2^t)/(1−β1^t) ≈ 2.5–3× lr."""
    from lora_lens.train.masked_adamw import MaskedAdamW
    from lora_lens.train.masks import UpdateMasks

    lr, steps = 1e-3, 1200
    g = torch.Generator().manual_seed(4)
    A = torch.nn.Parameter(torch.randn(8, 3, generator=g, dtype=torch.float64))
    grad = torch.randn(8, 3, generator=g, dtype=torch.float64).sign() * (0.5 + torch.rand(8, 3, generator=g))
    masks = UpdateMasks({"x.lora_A": A}, SparseSettings("row", "A", "step", keep=0.2), seed=5)
    opt = MaskedAdamW([A], masks.mask_of, lr=lr, weight_decay=0.0)
    frozen_for = torch.zeros(8, 3)
    worst, late_returns = 0.0, 0
    for step in range(steps):
        if step:
            masks.sample()
        keep = masks.masks["x.lora_A"]
        before = A.detach().clone()
        A.grad = grad.clone()
        masks.mask_grads()  # as the training loop does
        opt.step()
        moved = (A.detach() - before).abs()
        assert bool((moved[~keep] == 0).all())
        worst = max(worst, float(moved[keep].max()) / lr) if bool(keep.any()) else worst
        late_returns += int((keep & (frozen_for > 0) & (step > 1000)).sum())
        frozen_for = torch.where(keep, torch.zeros_like(frozen_for), frozen_for + 1)
    assert late_returns > 10  # entries did come back after long freezes, late in the run
    assert worst <= 1 + 1e-12  # |g|/(|g|+ε) < 1; 1e-12: float64 round-off of m̂/√v̂ for constant g


def test_chain_knots_merge_links_and_reset_optimizer(stories_path):
    cfg = config("chain", steps=7, knots=(2, 5), weight_decay=0.0)
    run = prepare(stories_path, cfg)
    paths = list(run.adapted.layers)
    original = {p: run.adapted.layers[p].base_layer.weight.detach().double().clone() for p in paths}
    events, lrs = [], []

    def expected_weight(p):
        s = run.adapted.layers[p].scaling
        return original[p] + sum(s * B.double() @ A.double() for A, B in (link[p] for link in run.links))

    def merge_atol(p):
        """Each merge rounds W + s·BA (a length-r product, a scaling, one addition) once in float32:
        |δW| ≤ γ_{r+2}(|W| + s|B||A|) per link, summed over the links merged so far (tests/tolerances.py)."""
        s = run.adapted.layers[p].scaling
        magnitude = original[p].abs() + sum(s * B.double().abs() @ A.double().abs() for A, B in
                                            (link[p] for link in run.links))
        rank = run.adapted.layers[p].lora_A.shape[0]
        return len(run.links) * gamma(rank + 2) * magnitude.max().item()

    def log(rec):
        if rec["event"] == "knot":
            events.append(rec["step"])
            assert len(run.optimizer.state) == 0  # a fresh optimizer: no moments, no step counters
            assert len(run.links) == len(events)
            for p in paths:
                layer = run.adapted.layers[p]
                torch.testing.assert_close(layer.base_layer.weight.double(), expected_weight(p), atol=merge_atol(p),
                                           rtol=0)
                assert torch.count_nonzero(layer.lora_B) == 0  # the new link starts at B = 0 ...
                assert not torch.equal(layer.lora_A.detach(), run.links[-1][p][0])  # ... with a fresh A
        if rec["event"] == "step":
            lrs.append(rec["lr"])
            if rec["step"] - 1 in cfg.knots:
                steps = {int(s["step"]) for s in run.optimizer.state.values()}
                assert steps == {1}  # counters restarted at the knot

    result = fit(run, log=log)
    assert events == [2, 5] and result.knots == (2, 5)
    assert lrs == [learning_rate(t, cfg) for t in range(cfg.steps)]  # one schedule across knots
    assert len(run.links) == 3  # the last link is merged at the end
    for p in paths:
        torch.testing.assert_close(run.adapted.layers[p].base_layer.weight.double(), expected_weight(p),
                                   atol=merge_atol(p), rtol=0)
        assert torch.count_nonzero(run.adapted.layers[p].lora_B) == 0


def test_chain_knots_evenly_spaced():
    assert TrainConfig(method="chain", steps=40).chain_knots() == (13, 27)
    assert TrainConfig(method="chain", steps=40, links=2).chain_knots() == (20,)
    assert TrainConfig(method="chain", steps=40, links=1).chain_knots() == ()
    with pytest.raises(ConfigError, match="strictly between"):
        TrainConfig(method="chain", steps=10, knots=(0, 5))
    with pytest.raises(ConfigError, match="options of --method chain"):
        TrainConfig(method="lora", knots=(3,))


def test_loss_falls_on_synthetic_task(stories_path):
    result = train(stories_path, "lora", steps=30, lr=1e-2, batch_size=8, seq_len=32, device="cpu")
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 3.0, result.losses
    assert result.eval_loss < result.eval_loss_before - 3.0
    assert result.tokens == 30 * 8 * 32 and result.tokens_per_s > 0


def test_same_seed_same_run(stories_path):
    a = train(stories_path, "lora-sp", **FAST)
    b = train(stories_path, "lora-sp", **FAST)
    assert a.losses == b.losses


def test_unknown_targets_named(stories_path):
    with pytest.raises(ConfigError, match="match no module.*self_attn.q_proj"):
        prepare(stories_path, config("lora", targets=("query", "q_proj")))


def test_target_weights_helper_sees_stories(stories_path):
    assert len(target_weights(stories_path, ("q_proj",))) == 5
