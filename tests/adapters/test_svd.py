"""SVD-basis adapter: identity at zero, free reference, cache, hack axes and the projection math."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_rlm.adapters.svd as svd
from lightning_rlm.adapters import SVDAdapterModel, add_svd_adapter
from lightning_rlm.adapters.svd import (
    StaleSVDCacheError,
    cached_pair_diffs,
    contrastive_grad_diffs,
    erase_hack_component,
    hack_axes,
    hack_component,
    hack_cosine,
    project_gradients,
    route_hack_component,
)
from lightning_rlm.rollout import completion_logprobs

VOCAB = 64
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def _batch() -> tuple[Tensor, Tensor]:
    ids = torch.tensor([[0, 0, 5, 9, 13, 20, 21], [7, 33, 2, 8, 40, 41, 42]])  # [2, T], row 0 left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


def _logits(model: torch.nn.Module) -> Tensor:
    ids, mask = _batch()
    return model(input_ids=ids, attention_mask=mask).logits  # [2, T, V]


def _perturb(model: SVDAdapterModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.delta_parameters() + model.hack_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_identity_at_zero_is_bit_exact() -> None:
    base = _base()
    model = add_svd_adapter(copy.deepcopy(base), TARGETS)
    assert len(model.target_names) == 2 * 7 and "lm_head" not in " ".join(model.target_names)
    with torch.no_grad():
        ref = _logits(base)
        assert torch.equal(_logits(model), ref)
    out = _logits(model)  # grad enabled: the delta path runs (0.0 added), still bit-identical
    assert out.requires_grad and torch.equal(out.detach(), ref)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"delta_s", "delta_s_hack"}
    layer = model.svd_layers()["model.layers.0.mlp.up_proj"]  # W [64, 32]: r = 32
    assert layer.U.shape == (64, 32) and layer.Vh.shape == (32, 32) and layer.delta_s.shape == (32,)


def test_forward_matches_the_rebuilt_weight() -> None:
    base = _base()
    model = add_svd_adapter(copy.deepcopy(base), TARGETS)
    _perturb(model)
    edited = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in model.svd_layers().items():
            s = layer.delta_s + layer.delta_s_hack  # [r]
            edited.get_submodule(name).weight.add_(layer.U @ torch.diag(s) @ layer.Vh)
        torch.testing.assert_close(_logits(model), _logits(edited), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(_logits(model), _logits(base))


def test_reference_equals_base_and_modes_equal_zeroed_vectors() -> None:
    base = _base()
    model = add_svd_adapter(copy.deepcopy(base), TARGETS)
    _perturb(model)
    ids, mask = _batch()
    with torch.no_grad():
        base_logp = completion_logprobs(base, ids, mask, 3)
    model.train()
    with model.reference() as ref:
        assert not ref.training and not torch.is_grad_enabled()
        assert torch.equal(completion_logprobs(ref, ids, mask, 3), base_logp)
    assert model.training
    # each mode equals the model with the switched-off vector literally zeroed
    zeroed_hack = copy.deepcopy(model)
    with torch.no_grad():
        for p in zeroed_hack.hack_parameters():
            p.zero_()
        with model.no_hack():
            assert torch.equal(_logits(model), _logits(zeroed_hack))
        with model.adapters("hack_only"):
            only = _logits(model)
        for p in zeroed_hack.delta_parameters():
            p.zero_()
        assert torch.equal(_logits(zeroed_hack), _logits(base))
        assert not torch.equal(only, _logits(base))
    with pytest.raises(ValueError, match="mode must be one of"), model.adapters("nope"):  # type: ignore[arg-type]
        pass
    # with grad on, an ablated vector stays in the graph with an exact zero gradient (DDP)
    model.zero_grad(set_to_none=True)
    with model.no_hack():
        _logits(model).square().mean().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.hack_parameters())
    assert all(torch.count_nonzero(p.grad) > 0 for p in model.delta_parameters())


def test_svd_cache_is_reused_and_detects_a_changed_weight(tmp_path, monkeypatch) -> None:
    base = _base()
    first = add_svd_adapter(copy.deepcopy(base), TARGETS, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == len(first.target_names)
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    def no_svd(weight: Tensor):
        raise AssertionError("the cached SVD should have been loaded")

    monkeypatch.setattr(svd, "compute_svd", no_svd)
    second = add_svd_adapter(copy.deepcopy(base), TARGETS, cache_dir=tmp_path)
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    for name, layer in second.svd_layers().items():
        assert torch.equal(layer.U, first.svd_layers()[name].U)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(StaleSVDCacheError, match=r"'model\.layers\.1\.mlp\.down_proj'"):
        add_svd_adapter(changed, TARGETS, cache_dir=tmp_path)
    assert first.fingerprint() == second.fingerprint()


def test_projection_against_hand_computed_vectors() -> None:
    V = torch.tensor([[1.0, 0.0, 0.0]])  # [1, 3]
    g = torch.tensor([-2.0, 3.0, 1.0])  # descent step -g moves +2 along v: hack-ward
    assert torch.equal(hack_component(g, V), torch.tensor([-2.0, 0.0, 0.0]))
    assert torch.equal(erase_hack_component(g, V), torch.tensor([0.0, 3.0, 1.0]))
    main, hack = route_hack_component(g, V)
    assert torch.equal(main, torch.tensor([0.0, 3.0, 1.0])) and torch.equal(hack, torch.tensor([-2.0, 0.0, 0.0]))
    g_away = torch.tensor([2.0, 3.0, 1.0])  # the step moves away from the hack: one-sided, nothing removed
    assert torch.equal(erase_hack_component(g_away, V), g_away)
    assert torch.equal(route_hack_component(g_away, V)[1], torch.zeros(3))
    # two axes, not axis-aligned: v1 = (0.6, 0.8, 0), v2 = (0, 0, 1)
    V2 = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    g = torch.tensor([1.0, -2.0, 1.0])  # c = (0.6 - 1.6, 1) = (-1, 1): only v1 is hack-ward
    torch.testing.assert_close(hack_component(g, V2), torch.tensor([-0.6, -0.8, 0.0]))
    erased = erase_hack_component(g, V2)
    torch.testing.assert_close(erased, torch.tensor([1.6, -1.2, 1.0]))
    torch.testing.assert_close(V2 @ erased, torch.tensor([0.0, 1.0]))  # max(c, 0)
    main, hack = route_hack_component(g, V2)
    torch.testing.assert_close(main + hack, g)
    torch.testing.assert_close(hack, torch.tensor([-0.6, -0.8, 0.0]))
    assert torch.equal(hack_component(g, torch.zeros(0, 3)), torch.zeros(3))  # no axis: nothing removed
    # cosine of the descent step with the top axes, over two modules: -g = (2, -3, -1 | 0, 0, -1)
    cos = hack_cosine([torch.tensor([-2.0, 3.0, 1.0]), torch.tensor([0.0, 0.0, 1.0])],
                      [V, torch.tensor([[0.0, 1.0, 0.0]])])
    torch.testing.assert_close(cos, torch.tensor(2.0 / (15 ** 0.5 * 2 ** 0.5)))


@pytest.mark.parametrize("projection", ["none", "measure_only", "erase", "route"])
def test_project_gradients_on_a_model(projection) -> None:
    model = add_svd_adapter(_base(), TARGETS, train_hack=projection == "route")
    _perturb(model)
    model.zero_grad(set_to_none=True)
    _logits(model).square().mean().backward()
    layers = model.svd_layers()
    g = {n: layer.delta_s.grad.clone() for n, layer in layers.items()}
    axes = {n: torch.nn.functional.normalize(torch.randn(1, layer.rank, generator=torch.Generator().manual_seed(i)),
                                             dim=1) for i, (n, layer) in enumerate(layers.items())}
    stats = project_gradients(model, axes, projection)
    flat_g = torch.cat(list(g.values()))
    torch.testing.assert_close(stats.grad_norm, flat_g.norm())
    removed_sq = 0.0
    for n, layer in layers.items():
        c = (axes[n] @ g[n]).item()
        removed = hack_component(g[n], axes[n])
        removed_sq += removed.square().sum()
        if projection in ("erase", "route"):
            torch.testing.assert_close((axes[n] @ layer.delta_s.grad).item(), max(c, 0.0), atol=1e-6, rtol=0)
            torch.testing.assert_close(layer.delta_s.grad, g[n] - removed)
        else:
            assert torch.equal(layer.delta_s.grad, g[n])
        if projection == "route":
            assert torch.equal(layer.delta_s_hack.grad, removed)
        else:
            assert layer.delta_s_hack.grad is None  # never trains
    torch.testing.assert_close(stats.removed_frac, removed_sq.sqrt() / flat_g.norm())
    assert -1.0 <= stats.hack_cos.item() <= 1.0 and stats.hack_cos.item() != 0.0


def test_hack_axes_orientation_noise_floor_and_empty() -> None:
    u = torch.zeros(8)
    u[2] = 1.0
    w = torch.zeros(8)
    w[5] = 1.0
    # three pairs push along +u a little, one along -u a lot: the majority (not the sum) orients the axis
    D = torch.stack([u, 1.5 * u, 0.5 * u + 0.01 * w, -2.0 * u])  # [4, 8]
    axes = hack_axes(D, top_k=2, noise_floor=0.0)
    assert axes.directions.shape == (2, 8)
    torch.testing.assert_close(axes.directions[0], u, atol=1e-3, rtol=0)
    torch.testing.assert_close(axes.agreement[0], torch.tensor(0.75))
    torch.testing.assert_close(axes.directions @ axes.directions.T, torch.eye(2), atol=1e-6, rtol=0)
    weak = hack_axes(D, top_k=2, noise_floor=0.1)  # the w axis is ~0.003 of the u axis: dropped
    assert weak.directions.shape == (1, 8)
    assert hack_axes(torch.zeros(4, 8), top_k=2).directions.shape == (0, 8)
    with pytest.raises(ValueError, match="top_k"):
        hack_axes(D, top_k=0)


def test_contrastive_diffs_are_per_pair_nll_gradient_differences() -> None:
    model = add_svd_adapter(_base(), TARGETS, train_hack=False)
    pairs = [([5, 9, 13], [20, 21, 22], [20, 30, 21, 22]), ([7, 8], [40, 41], [41, 40, 33])]
    diffs = contrastive_grad_diffs(model, pairs, pad_token_id=0)
    assert set(diffs) == set(model.target_names)
    assert all(d.shape == (2, layer.rank) for d, layer in zip(diffs.values(), model.svd_layers().values()))

    def nll_grad(prompt: list[int], completion: list[int]) -> dict[str, Tensor]:
        ids = torch.tensor([prompt + completion])
        model.zero_grad(set_to_none=True)
        logp = completion_logprobs(model, ids, torch.ones_like(ids), len(completion))
        (-logp.sum()).backward()
        return {n: layer.delta_s.grad.clone() for n, layer in model.svd_layers().items()}

    for i, (prompt, clean, hack) in enumerate(pairs):
        gc, gh = nll_grad(prompt, clean), nll_grad(prompt, hack)
        for n in diffs:
            torch.testing.assert_close(diffs[n][i], gc[n] - gh[n], atol=1e-5, rtol=1e-4)
    assert all(torch.count_nonzero(d) > 0 for d in diffs.values())


def test_pair_diffs_cache_hits_and_leaves_another_writer_s_file_alone(tmp_path) -> None:
    """The pair gradients are computed once and then read back; a run writing the same entry at the same time (its
    temporary file at the shared name used before) is neither overwritten nor moved."""
    model = add_svd_adapter(_base(), TARGETS, train_hack=False)
    pairs = [([5, 9, 13], [20, 21, 22], [20, 30, 21, 22])]
    texts = [("p", "clean", "hack")]
    diffs, hit = cached_pair_diffs(model, pairs, texts, 0, tmp_path)
    (entry,) = tmp_path.glob("pair_grads_*.pt")
    other = entry.with_name(entry.name + ".tmp")
    other.write_text("half of another writer's file")
    entry.unlink()
    again, hit_again = cached_pair_diffs(model, pairs, texts, 0, tmp_path)  # written anew beside the other file
    assert not hit and not hit_again and entry.is_file()
    assert other.read_text() == "half of another writer's file"
    read, hit_read = cached_pair_diffs(model, pairs, texts, 0, tmp_path)
    assert hit_read and all(torch.equal(read[n], diffs[n]) and torch.equal(again[n], diffs[n]) for n in diffs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.name, other.name])
