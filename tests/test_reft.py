"""ReFT (LoReFT and DiReFT): the numbers against a plain-PyTorch formula, the positions it edits (padding,
prompt lengths, overlapping windows, generation), R's orthonormality under training, the counts, the file,
classification and the errors. (The cross-method contract — grads, save/load, disable, merge refused,
delete, mixed batches — is checked in test_contract.py.)

The reference, written here independently of feathertune.functional, on each edited position's h:

    LoReFT: h + (W·h + b − R·h)·R      DiReFT: h + (W·h + b)·R      (h a row vector, R (r, d))

at the first f and the last l real tokens of each row's prompt, the first window's edit first.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import feathertune as ft
from feathertune import functional as fn
from feathertune.inspect import describe
from feathertune.methods.reft import ReftBlock, ReftConfig, ReftIntervention
from feathertune import loss
from feathertune.wrapping import BASE, wrapped_layers
from models import BUILDERS, SmallCNN, random_ids

pytest.importorskip("transformers")

PREFIX = "base_model.model."
BLOCKS = {"llama": "model.layers.{}", "gpt2": "transformer.h.{}", "bert": "bert.encoder.layer.{}"}
D = 32  # every tiny model's hidden size


# --- the reference ------------------------------------------------------------------------------------

def reference_edit(h: torch.Tensor, kind: str, R, W, b) -> torch.Tensor:
    """Φ(h) for row vectors h (..., d), from the paper's equations."""
    coordinates = h @ W.T + b
    if kind == "loreft":
        coordinates = coordinates - h @ R.T
    return h + coordinates @ R


def reference_windows(mask: torch.Tensor, prompt_lengths, first: int, last: int) -> list[tuple[list[int], list[int]]]:
    """Per row: (positions of the first window, positions of the last), from the mask's real tokens."""
    rows = []
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        length = len(real) if prompt_lengths is None else min(int(prompt_lengths[b]), len(real))
        prompt = real[:length]
        rows.append((prompt[:first], prompt[max(length - last, 0):] if last else []))
    return rows


def reference_block_output(h: torch.Tensor, adapters, mask, prompt_lengths) -> torch.Tensor:
    """The edited block output for base output h (B, T, d): each adapter (first, last, shared, tensors by
    window) reads h; the edits add up."""
    out = h.clone()
    for first, last, share, tensors, kind in adapters:
        edited = h.clone()
        for b, (f_pos, l_pos) in enumerate(reference_windows(mask, prompt_lengths, first, last)):
            if share:
                for t in sorted(set(f_pos) | set(l_pos)):
                    edited[b, t] = reference_edit(h[b, t], kind, *tensors["shared"])
                continue
            for window, positions in (("first", f_pos), ("last", l_pos)):
                for t in positions:
                    edited[b, t] = reference_edit(edited[b, t], kind, *tensors[window])
        out = out + (edited - h)
    return out


# --- helpers ------------------------------------------------------------------------------------------

def blocks(model) -> dict[str, ReftBlock]:
    return {n: layer for n, layer in wrapped_layers(model) if isinstance(layer, ReftBlock)}


def interventions(model, name: str = "default") -> dict[str, ReftIntervention]:
    return {f"{path}.{window}": iv for path, block in blocks(model).items() if name in block.reft
            for window, iv in block.reft[name].windows.items()}


@torch.no_grad()
def perturb(model, name: str = "default", seed: int = 0) -> None:
    """New random R (orthonormal for LoReFT, through its parametrisation), W and b for every intervention."""
    g = torch.Generator().manual_seed(seed)
    for iv in interventions(model, name).values():
        R = torch.randn(iv.R.shape, generator=g, dtype=torch.float64)
        if iv.kind == "loreft":
            iv.R = torch.linalg.qr(R.T).Q.T.to(iv.R.dtype)  # through the parametrisation
        else:
            iv.R.copy_(R)
        iv.W.copy_(0.3 * torch.randn(iv.W.shape, generator=g, dtype=torch.float64))
        iv.b.copy_(0.3 * torch.randn(iv.b.shape, generator=g, dtype=torch.float64))


def tensors_of(model, path: str, name: str = "default") -> dict[str, tuple]:
    return {w: tuple(t.detach().to(torch.float64) for t in iv.tensors().values())
            for w, iv in blocks(model)[path].reft[name].windows.items()}


def padded_batch(lengths: list[int], side: str, total: int = 10, seed: int = 1):
    """(input_ids, attention_mask) with rows of `lengths` real tokens, padded on `side`."""
    ids = random_ids(len(lengths), total, seed=seed)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        if side == "left":
            mask[b] = mask[b].flip(0)
    return ids.masked_fill(mask == 0, 0), mask


def block_io(model, path: str, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(the block's own output h, the edited output) in one forward of the model."""
    seen = {}
    wrapper = model.get_submodule(path)
    hooks = [wrapper.base.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out)),
             wrapper.register_forward_hook(lambda m, a, out: seen.__setitem__("edited", out))]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    return first(seen["h"]).clone(), first(seen["edited"]).clone()


def orthonormal_error(R: torch.Tensor) -> float:
    return (R @ R.T - torch.eye(R.shape[0], dtype=R.dtype)).abs().max().item()


# --- the math ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_pure_functions_and_the_intervention_equal_the_formula(kind):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    R = torch.randn(4, 16, generator=g, dtype=torch.float64)
    R = torch.linalg.qr(R.T).Q.T if kind == "loreft" else R
    W, b = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    update = fn.loreft_update if kind == "loreft" else fn.direft_update
    assert (h + update(h, R, W, b) - reference_edit(h, kind, R, W, b)).abs().max() <= 1e-10

    iv = ReftIntervention(16, 4, kind, 0.0, dtype=torch.float64, device=None)
    iv.load({"R": R, "W": W, "b": b})
    assert (iv.R - R).abs().max() <= 1e-12
    assert (h + iv(h) - reference_edit(h, kind, R, W, b)).abs().max() <= 1e-10


@pytest.mark.parametrize("model_kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_model_equals_the_base_with_hooked_edits(model_kind, kind):
    """float64: logits ≤1e-10 from the base with the formula hooked on each block's output, and each
    block's edited output is the formula applied to its own output, on a padded batch."""
    base = BUILDERS[model_kind](seed=0, dtype=torch.float64)
    config = ReftConfig(kind=kind, r=3, positions="f2+l3")
    model = ft.attach(copy.deepcopy(base), config)
    assert list(blocks(model)) == [BLOCKS[model_kind].format(i) for i in range(2)]
    perturb(model)
    ids, mask = padded_batch([10, 7, 4], "left" if model_kind != "bert" else "right")

    reference = copy.deepcopy(base)
    for path in blocks(model):
        adapters = [(2, 3, False, tensors_of(model, path), kind)]

        def hook(module, args, out, adapters=adapters):
            h = out[0] if isinstance(out, tuple) else out
            edited = reference_block_output(h, adapters, mask, None)
            return (edited, *out[1:]) if isinstance(out, tuple) else edited

        reference.get_submodule(path).register_forward_hook(hook)
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        expected = reference(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert (adapted - plain).abs().max() > 1e-4, "the perturbed edits should change the output"
    assert (adapted - expected).abs().max() <= 1e-10

    for path in blocks(model):
        h, edited = block_io(model, path, input_ids=ids, attention_mask=mask)
        want = reference_block_output(h, [(2, 3, False, tensors_of(model, path), kind)], mask, None)
        assert (edited - want).abs().max() <= 1e-10, path


# --- positions --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_kind", ["llama", "gpt2", "bert"])
def test_only_the_window_positions_change(side, model_kind):
    """At the edited block, every position outside the windows is its own output bit for bit; with
    prompt_lengths the answer tokens are left alone too."""
    model = ft.attach(BUILDERS[model_kind](seed=0), ReftConfig(r=2, positions="f2+l1", layers=[1]))
    perturb(model)
    ids, mask = padded_batch([10, 8, 5], side)
    path = BLOCKS[model_kind].format(1)
    for prompt_lengths in (None, torch.tensor([6, 3, 5])):
        extra = {} if prompt_lengths is None else {"prompt_lengths": prompt_lengths}
        h, edited = block_io(model, path, input_ids=ids, attention_mask=mask, **extra)
        changed = (edited != h).any(-1)  # (B, T)
        expected = torch.zeros_like(changed)
        for b, (f_pos, l_pos) in enumerate(reference_windows(mask, prompt_lengths, 2, 1)):
            expected[b, f_pos + l_pos] = True
        assert torch.equal(changed, expected), (prompt_lengths, changed, expected)


def test_short_prompts_and_overlapping_windows():
    """Each window is clipped to the prompt; an overlapping position gets the first window's edit, then
    the last one's (float64, ≤1e-10); with share_weights one edit per position."""
    base = BUILDERS["llama"](seed=0, dtype=torch.float64)
    ids, mask = padded_batch([10, 4, 2, 1], "left")
    path = BLOCKS["llama"].format(0)
    for share in (False, True):
        model = ft.attach(copy.deepcopy(base), ReftConfig(r=2, positions="f3+l3", layers=[0], share_weights=share))
        perturb(model)
        h, edited = block_io(model, path, input_ids=ids, attention_mask=mask)
        want = reference_block_output(h, [(3, 3, share, tensors_of(model, path), "loreft")], mask, None)
        assert (edited - want).abs().max() <= 1e-10, share
        assert torch.equal((edited != h).any(-1)[1:], mask[1:].bool()), "prompts of ≤ 6 tokens are edited everywhere"
    # Overlap really composes: row 1 (4 tokens) position 2 gets both edits, position 0 only the first one.
    model = ft.attach(copy.deepcopy(base), ReftConfig(r=2, positions="f3+l3", layers=[0]))
    perturb(model)
    h, edited = block_io(model, path, input_ids=ids, attention_mask=mask)
    tensors = tensors_of(model, path)
    t = 6 + 2  # row 1 is left-padded: its real tokens are positions 6..9
    both = reference_edit(reference_edit(h[1, t], "loreft", *tensors["first"]), "loreft", *tensors["last"])
    assert (edited[1, t] - both).abs().max() <= 1e-10
    assert (edited[1, 6] - reference_edit(h[1, 6], "loreft", *tensors["first"])).abs().max() <= 1e-10


def test_two_active_adapters_each_read_h_and_add_and_mixed_rows_get_their_own():
    base = BUILDERS["gpt2"](seed=0, dtype=torch.float64)
    model = copy.deepcopy(base)
    ft.attach(model, ReftConfig(r=2, positions="f2+l2"), name="a")
    ft.attach(model, ReftConfig(kind="direft", r=3, positions="l3", layers=[1]), name="b")
    perturb(model, "a", seed=0)
    perturb(model, "b", seed=1)
    ft.set_active(model, ["a", "b"])
    ids, mask = padded_batch([10, 6, 9], "left")
    path = BLOCKS["gpt2"].format(1)
    h, edited = block_io(model, path, input_ids=ids, attention_mask=mask)
    adapters = [(2, 2, False, tensors_of(model, path, "a"), "loreft"),
                (0, 3, False, tensors_of(model, path, "b"), "direft")]
    assert (edited - reference_block_output(h, adapters, mask, None)).abs().max() <= 1e-10

    names = ["a", "b", BASE]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        one = {"input_ids": ids[row:row + 1], "attention_mask": mask[row:row + 1]}
        with torch.no_grad():
            if name == BASE:
                alone = base(**one).logits
            else:
                ft.set_active(model, name)
                alone = model(**one).logits
        assert (mixed[row:row + 1] - alone).abs().max() <= 1e-10, name


def test_dropout_drops_parts_of_the_edit_never_h():
    """Training mode: each entry of the edit is dropped or doubled (p = 0.5); h outside the windows and
    the padding stay as they are. Eval mode: the whole edit, deterministic."""
    model = ft.attach(BUILDERS["llama"](seed=0), ReftConfig(r=4, positions="f2+l2", layers=[0], dropout=0.5))
    perturb(model)
    ids, mask = padded_batch([10, 6], "right")
    path = BLOCKS["llama"].format(0)
    model.eval()
    h, whole = block_io(model, path, input_ids=ids, attention_mask=mask)
    assert torch.equal(whole, block_io(model, path, input_ids=ids, attention_mask=mask)[1])
    model.train()
    h_train, dropped = block_io(model, path, input_ids=ids, attention_mask=mask)
    assert torch.equal(h_train, h), "the tiny llama has no dropout of its own"
    outside = ~(whole != h).any(-1)
    assert torch.equal(dropped[outside], h[outside]), "dropout must not touch h outside the windows"
    edit, full = (dropped - h)[~outside], (whole - h)[~outside]
    kept = (edit - 2 * full).abs() <= 1e-6
    assert bool((kept | (edit == 0)).all()) and 0.2 < kept.float().mean() < 0.8


def test_prompt_lengths_of_the_wrong_shape_are_refused():
    model = ft.attach(BUILDERS["llama"](seed=0), ReftConfig(r=2))
    with pytest.raises(ft.ConfigError, match="prompt_lengths has 2 entries but the batch has 3 rows"):
        model(input_ids=random_ids(), prompt_lengths=torch.tensor([3, 4]))


def test_the_training_loop_passes_the_prompt_of_each_row():
    """Real tokens before the first supervised one, right padding; a row learned from its first token counts whole."""
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, 7, 8, -100, -100, -100], [1, 2, 3, 4, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    assert loss.prompt_lengths(labels, mask).tolist() == [3, 1, 4]


# --- generation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_kind", ["llama", "gpt2"])
def test_greedy_generation_edits_the_prompt_only_and_equals_recomputing(model_kind):
    """A left-padded batch of two prompts: generate with the KV cache edits the windows at the prefill and
    nothing at the decode steps, and its tokens and scores equal a full forward per step with prompt_lengths."""
    model = ft.attach(BUILDERS[model_kind](seed=0), ReftConfig(r=4, positions="f2+l2"))
    perturb(model)
    ids, mask = padded_batch([6, 4], "left", total=6, seed=3)
    calls, own = [], {}  # per block call: which positions the edit changed
    hooks = []
    for path, block in blocks(model).items():
        hooks.append(block.base.register_forward_hook(lambda m, a, out, path=path: own.__setitem__(path, out)))
        hooks.append(block.register_forward_hook(
            lambda m, a, out, path=path: calls.append((out != own[path]).any(-1))))
    steps = 5
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=True,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    window = torch.zeros_like(mask, dtype=torch.bool)
    for b, (f_pos, l_pos) in enumerate(reference_windows(mask, None, 2, 2)):
        window[b, f_pos + l_pos] = True
    prefill, decode = calls[:2], calls[2:]  # two blocks a forward
    assert all(torch.equal(changed, window) for changed in prefill)
    assert len(decode) == 2 * (steps - 1) and all(changed.shape == (2, 1) and not changed.any() for changed in decode)
    for hook in hooks:
        hook.remove()
    seq, seq_mask, prompt_lengths = ids, mask, mask.sum(-1)
    with torch.no_grad():
        for step in range(steps):
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=seq_mask, position_ids=positions,
                           prompt_lengths=prompt_lengths).logits[:, -1]
            assert (logits - out.scores[step]).abs().max() <= 1e-5, step
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    assert torch.equal(out.sequences, seq)


# --- training keeps R orthonormal ---------------------------------------------------------------------------

def test_R_stays_orthonormal_through_100_adamw_steps_and_reloads_exactly(tmp_path):
    """lr 1e-2 with AdamW's weight decay (which would zero R under torch's bare Householder map)."""
    model = ft.attach(BUILDERS["llama"](seed=0), ReftConfig(r=4, positions="f3+l3", layers=[1]))
    start = {k: iv.R.detach().clone() for k, iv in interventions(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    ids = random_ids(4, 12, seed=2)
    model.train()
    losses = []
    for _ in range(100):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.1, losses[::10]  # random tokens: little to learn, but it learns
    for key, iv in interventions(model).items():
        assert orthonormal_error(iv.R.detach()) <= 1e-5, key
        assert (iv.R.detach() - start[key]).abs().max() > 1e-2, f"{key}: R did not train"
    ft.save_adapter(model, tmp_path)
    loaded = ft.load_adapter(BUILDERS["llama"](seed=0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# --- counts, inspect and the file ----------------------------------------------------------------------

@pytest.mark.parametrize("settings, windows", [
    ({}, 2), ({"share_weights": True}, 1), ({"positions": "l5"}, 1), ({"positions": "f3", "share_weights": True}, 1),
    ({"kind": "direft", "r": 8}, 2), ({"layers": [1], "r": 1}, 2),
])
def test_trainable_count_is_2dr_plus_r_per_intervention_and_inspect_prints_it(settings, windows, tmp_path):
    for model_kind in ("llama", "gpt2", "bert"):
        model = BUILDERS[model_kind](seed=0)
        total, buffers = sum(p.numel() for p in model.parameters()), len(list(model.buffers()))
        config = ReftConfig(**settings)
        ft.attach(model, config)
        layers = 2 if config.layers == "all" else len(config.layers)
        expected = layers * windows * (2 * D * config.r + config.r)
        assert ft.trainable_parameters(model) == (expected, total + expected), model_kind
        assert len(list(model.buffers())) == buffers, "the parametrisation should keep no d×d buffer"
        shown = describe(ft.save_adapter(model, tmp_path / model_kind))
        assert f"trainable:   {expected:,} parameters" in shown, shown
        assert "reft (REFT); not mergeable" in shown, shown


def test_file_holds_R_W_b_per_block_and_window_and_the_resolved_config(tmp_path):
    model = ft.attach(BUILDERS["bert"](seed=0), ReftConfig(r=3, positions="f2+l4", layers=[1],
                                                           modules_to_save=["classifier"]))
    perturb(model)
    ft.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    block = PREFIX + BLOCKS["bert"].format(1)
    expected = {PREFIX + "classifier.weight": ((3, D), "F32"), PREFIX + "classifier.bias": ((3,), "F32")}
    for window in ("first", "last"):
        expected.update({f"{block}.reft.{window}.R": ((3, D), "F64"), f"{block}.reft.{window}.W": ((3, D), "F32"),
                         f"{block}.reft.{window}.b": ((3,), "F32")})
    assert found == expected
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        R = f.get_tensor(f"{block}.reft.first.R")
    assert orthonormal_error(R) <= 1e-12, "the file holds R itself"
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert values["peft_type"] == "REFT" and values["task_type"] == "SEQ_CLS"
    fields = ("kind", "r", "layers", "positions", "share_weights", "dropout", "modules_to_save")
    assert {k: values[k] for k in fields} == {"kind": "loreft", "r": 3, "layers": [1], "positions": "f2+l4",
                                              "share_weights": False, "dropout": 0.0, "modules_to_save": ["classifier"]}
    loaded = ft.load_adapter(BUILDERS["bert"](seed=0), tmp_path)
    ids, mask = padded_batch([10, 5], "right")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_a_file_for_another_model_is_refused_clearly(tmp_path):
    model = ft.attach(BUILDERS["llama"](seed=0), ReftConfig(r=2))
    ft.save_adapter(model, tmp_path)
    with pytest.raises(ft.AdapterMismatchError, match=r"this model has no module 'model\.layers\.0'"):
        ft.load_adapter(BUILDERS["gpt2"](seed=0), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ft.AdapterMismatchError, match=r"reft\.first\.R: file has shape \(2, 32\), this model needs "
                                                      r"\(2, 48\)"):
        ft.load_adapter(wider, tmp_path)
    assert not blocks(wider), "a refused file leaves the model as it was"


def test_a_file_whose_layers_disagree_with_its_tensors_or_has_unknown_keys_is_refused(tmp_path):
    model = ft.attach(BUILDERS["llama"](seed=0), ReftConfig(r=2, layers=[1]))
    ft.save_adapter(model, tmp_path)
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**values, "layers": [0]}))
    with pytest.raises(ft.AdapterMismatchError, match="not on the blocks the config names"):
        ft.load_adapter(BUILDERS["llama"](seed=0), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**values, "intervention_type": "nodireft"}))
    with pytest.raises(ft.UnsupportedAdapterError, match="intervention_type"):
        ft.load_adapter(BUILDERS["llama"](seed=0), tmp_path)


# --- classification --------------------------------------------------------------------------------------

def test_reft_trains_the_tiny_bert_classifier():
    model = ft.attach(BUILDERS["bert"](seed=0), ReftConfig(r=4, positions="f3+l3", modules_to_save=["classifier"]))
    ids, mask = padded_batch([10, 8, 6, 9, 7, 10], "right", seed=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    edits = {k: iv.W.detach().clone() for k, iv in interventions(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    assert all(not torch.equal(iv.W, edits[k]) for k, iv in interventions(model).items()), "every edit trains"


# --- errors ---------------------------------------------------------------------------------------------

def test_invalid_values_are_all_listed_with_what_is_allowed():
    with pytest.raises(ft.ConfigError) as info:
        ReftConfig(kind="noreft", r=0, layers=[1, 1], positions="f7l7", share_weights="yes", dropout=1.5,
                   modules_to_save="classifier")
    problems = info.value.problems
    assert len(problems) == 7, problems
    for field, allowed in (("kind='noreft'", "loreft, direft"), ("r=0", "positive integer"),
                           ("layers=[1, 1]", "'all' or a non-empty list of distinct block indices"),
                           ("positions='f7l7'", "'fK+lK'"), ("share_weights='yes'", "true or false"),
                           ("dropout=1.5", "[0, 1)"), ("modules_to_save='classifier'", "list of module names")):
        assert any(field in p and allowed in p for p in problems), (field, problems)


@pytest.mark.parametrize("positions", ["f0", "l0+f2", "first7", "", "f3+", "+l3", "f-1", "F7", 7])
def test_malformed_positions_are_refused(positions):
    with pytest.raises(ft.ConfigError, match="positions=.* must be 'fK'"):
        ReftConfig(positions=positions)


@pytest.mark.parametrize("positions, counts", [("f7+l7", (7, 7)), ("f1", (1, 0)), ("l12", (0, 12))])
def test_positions_parse(positions, counts):
    assert ReftConfig(positions=positions).windows()[:2] == counts


def test_layers_beyond_the_model_name_the_field_and_the_range():
    with pytest.raises(ft.ConfigError) as info:
        ft.attach(BUILDERS["gpt2"](seed=0), ReftConfig(layers=[0, 5]))
    message = str(info.value)
    for word in ("layers=[0, 5]", "[5]", "2 blocks", "transformer.h.0", "0–1", "'all'"):
        assert word in message, (word, message)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ft.TargetError, match="has none"):
        ft.attach(SmallCNN(), ReftConfig())


def test_a_rank_above_the_width_is_refused():
    model = BUILDERS["llama"](seed=0)
    with pytest.raises(ft.ConfigError, match=r"r=33 is more than the residual stream's width d=32.*r ≤ 32"):
        ft.attach(model, ReftConfig(r=33))
    assert not blocks(model)


def test_a_training_run_edits_each_chat_prompt_and_saves_an_adapter_that_loads(tmp_path, monkeypatch):
    """ft.run with method: reft on the tiny chat model: the loop tells the blocks each row's prompt
    (shorter than its tokens: the answer is not edited), and the run's adapter loads."""
    from runs import make_workspace

    from feathertune.methods import reft

    root, config = make_workspace(tmp_path)
    seen = []
    original = reft.ReftBlock.prompt

    def prompt(self, h):
        real, lengths = original(self, h)
        seen.append((self.context.prompt_lengths is not None, bool((lengths < real.sum(-1)).all())))
        return real, lengths

    monkeypatch.setattr(reft.ReftBlock, "prompt", prompt)
    values = {**{k: v for k, v in config.items() if k != "lora"}, "method": "reft",
              "adapter": {"r": 2, "positions": "f3+l3"}, "output": str(tmp_path / "run"),
              "train": {**config["train"], "checkpoint_every": 0}}
    result = ft.run(ft.TrainConfig.from_dict(values), log=lambda *_: None)
    training = seen[:2 * 6]  # two blocks, six steps of one micro-batch each
    assert training and all(given and shorter for given, shorter in training), training
    model, _ = ft.load_model(config["model"])
    ft.load_adapter(model, result.adapter)
    assert json.loads((result.adapter / "adapter_config.json").read_text())["layers"] == [0, 1]
