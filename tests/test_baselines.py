"""The peers of the benchmark (ademvl/bench/baselines.py): same frozen weights, same inputs, each its own method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ademvl import hub
from ademvl.config import AdemVLConfig
from ademvl.data import IGNORE_INDEX
from ademvl.model import AdemVLModel, decoder_layers
from ademvl.fusion import fuse_memvp_form
from ademvl.bench.baselines import LORA_TARGETS, METHODS, build_peer, build_peers, fuse_released, memvp_config
from ademvl.bench.peer import make_batch, twin
from ademvl.vision import blocks_to_run, tower_features

CONFIG = AdemVLConfig(llm="random:tiny-llama", vision="random:tiny-clip", scales=(16, 4))


@pytest.fixture(scope="module")
def base():
    return hub.load_llm(CONFIG.llm), hub.load_vision(CONFIG.vision)


@pytest.fixture(scope="module")
def peers(base):
    llm, vision = base
    return build_peers(llm, vision, CONFIG)


def batch(llm, image_mask=(True, True), text_len: int = 9):
    b = make_batch(llm.config.vocab_size, len(image_mask), text_len, 224, seed=3)
    b["image_mask"] = torch.tensor(image_mask)
    return b


def perturb(peer, seed: int = 1) -> None:
    """Random values in everything that trains, so zero-initialised parts take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peer.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_make_batch_is_fixed_text_with_bos_and_images() -> None:
    a, b = make_batch(100, 3, 7, 32, bos_id=1, seed=5), make_batch(100, 3, 7, 32, bos_id=1, seed=5)
    assert a["input_ids"].shape == (3, 7) and a["pixel_values"].shape == (3, 3, 32, 32)
    assert (a["input_ids"][:, 0] == 1).all() and (a["input_ids"][:, 1:] >= 3).all()
    assert torch.equal(a["labels"], a["input_ids"]) and a["attention_mask"].sum() == 21 and a["image_mask"].all()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_twin_shares_parameters_not_modules(base) -> None:
    llm, _ = base
    t = twin(llm)
    assert all(p is q for p, q in zip(llm.parameters(), t.parameters()))
    assert t.lm_head.weight is t.get_input_embeddings().weight  # tied weights stay tied
    handle = decoder_layers(t)[0].mlp.register_forward_hook(lambda *a: None)
    assert len(decoder_layers(llm)[0].mlp._forward_hooks) == 0
    handle.remove()


def test_peers_share_the_frozen_weights_and_leave_the_base_untouched(base, peers) -> None:
    llm, vision = base
    ids = make_batch(llm.config.vocab_size, 2, 6, 224)["input_ids"]
    with torch.no_grad():
        before = llm(input_ids=ids).logits
        build_peers(llm, vision, CONFIG)
        after = llm(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not any("lora" in name for name, _ in llm.named_modules())
    assert len(vision.encoder.layers) == 3 and all(not m._forward_hooks for m in llm.modules())
    emb = llm.get_input_embeddings().weight
    assert peers["text-only"].llm.get_input_embeddings().weight is emb
    assert peers["adem-vl"].model.llm.get_input_embeddings().weight is emb
    assert peers["llava"].llm.get_input_embeddings().weight is emb
    assert peers["llava"].vision.encoder.layers[0].mlp.fc1.weight is vision.encoder.layers[0].mlp.fc1.weight
    assert not any(p.requires_grad for p in llm.parameters()) and not any(p.requires_grad for p in vision.parameters())


def test_extra_tokens_and_trainable_counts(base, peers) -> None:
    llm, vision = base
    d, c, h, r = llm.config.hidden_size, vision.config.hidden_size, CONFIG.hidden_proj, 8
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    blocks = blocks_to_run(vision.config.num_hidden_layers, CONFIG.vision_layer)
    adapters = blocks * 2 * c * CONFIG.adapter_dim
    projector = c * h + h + h * d + d
    assert {m: p.extra_tokens for m, p in peers.items()} == {
        "text-only": 0, "adem-vl": 1, "adem-vl-reference": 1, "memvp": 0, "llava": patches}
    adem = adapters + 2 * projector + 2 * CONFIG.num_visual_tokens * d
    assert peers["adem-vl"].num_trainable() == peers["adem-vl-reference"].num_trainable() == adem
    assert peers["adem-vl"].num_trainable() == AdemVLModel(twin(llm), twin(vision), CONFIG.replace(base={})).num_trainable()
    assert peers["memvp"].num_trainable() == adapters + projector + 2 * patches * d
    attn = decoder_layers(llm)[0].self_attn
    lora = sum(r * (getattr(attn, t).in_features + getattr(attn, t).out_features) for t in LORA_TARGETS)
    assert peers["llava"].num_trainable() == (c * d + d + d * d + d) + lora * llm.config.num_hidden_layers
    assert peers["text-only"].num_trainable() == 0


def test_text_only_is_the_frozen_llm(base, peers) -> None:
    llm, _ = base
    b = batch(llm)
    with torch.no_grad():
        out = peers["text-only"](**b)
        ref = llm(input_ids=b["input_ids"], labels=b["labels"])
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)


def test_adem_peer_puts_cls_after_bos(base, peers) -> None:
    llm, _ = base
    peer = peers["adem-vl"]
    perturb(peer)
    b = batch(llm, image_mask=(True, False))
    with torch.no_grad():
        x = peer.inputs(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_mask"], b["labels"])
        embeds, mask, labels = x.embeds, x.mask, x.labels
        cls = peer.model.cls_proj(tower_features(peer.model.vision, b["pixel_values"][:1])[:, 0])  # (1, d)
    emb = llm.get_input_embeddings().weight
    ids = b["input_ids"]
    assert embeds.shape == (2, ids.shape[1] + 1, llm.config.hidden_size)
    torch.testing.assert_close(embeds[:, 0], emb[ids[:, 0]])  # BOS
    torch.testing.assert_close(embeds[0, 1], cls[0])  # the image sample's [cls]
    torch.testing.assert_close(embeds[1, 1], emb[0])  # no image: a plain token, no [cls]
    torch.testing.assert_close(embeds[:, 2:], emb[ids[:, 1:]])  # the text, shifted by one
    assert mask.shape == (2, ids.shape[1] + 1) and bool(mask.all())
    assert (labels[:, 1] == IGNORE_INDEX).all() and torch.equal(labels[:, 2:], b["labels"][:, 1:])


def test_fast_and_reference_peers_give_the_same_outputs(base) -> None:
    llm, vision = base
    fast, ref = build_peer("adem-vl", twin(llm), twin(vision), CONFIG), build_peer("adem-vl-reference", twin(llm), twin(vision), CONFIG)
    assert ref.model.memory.fusion is fuse_released and fast.model.memory.fusion is None
    assert all(torch.equal(p, q) for p, q in zip(fast.trainable_parameters(), ref.trainable_parameters()))  # same seed
    perturb(fast)
    perturb(ref)
    b = batch(llm)
    with torch.no_grad():
        torch.testing.assert_close(fast(**b).logits, ref(**b).logits, rtol=1e-5, atol=1e-5)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    assert torch.equal(fast.greedy(**inputs, new_tokens=4), ref.greedy(**inputs, new_tokens=4))


def test_memvp_peer_adds_memvp_fusion_at_every_mlp(base, peers) -> None:
    llm, vision = base
    peer = peers["memvp"]
    cfg = peer.model.config
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    assert cfg == memvp_config(CONFIG, patches).replace(base=cfg.base)
    assert cfg.scales == (patches,) and cfg.drop_ratio == 0 and not cfg.use_cls and peer.model.memory.fusion is fuse_memvp_form
    perturb(peer)
    b = batch(llm)
    mlp = decoder_layers(peer.model.llm)[1].mlp
    seen = {}
    handle = mlp.register_forward_hook(lambda mod, args, out: seen.update(h_n=args[0], out=out))  # runs after the fusion
    try:
        with torch.no_grad():
            x = peer.inputs(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_mask"])
            with x.memory:
                k, v = peer.model.memory.keys, peer.model.memory.values  # (B, N, d), raw keys
                peer.decoder(inputs_embeds=x.embeds, attention_mask=b["attention_mask"])
            h_n = seen["h_n"]
            plain = mlp.down_proj(mlp.act_fn(mlp.gate_proj(h_n)) * mlp.up_proj(h_n))
            expected = plain + cfg.alpha * F.silu(h_n @ k.transpose(1, 2)) @ v
    finally:
        handle.remove()
    assert k.shape == (2, patches, llm.config.hidden_size)
    torch.testing.assert_close(seen["out"], expected)
    assert not torch.allclose(seen["out"], plain)


def test_llava_peer_prepends_projected_patches_with_lora(base, peers) -> None:
    llm, vision = base
    peer = peers["llava"]
    b = batch(llm, image_mask=(True, False))
    n = peer.extra_tokens
    with torch.no_grad():
        out = peer(**b)
        hidden = vision(pixel_values=b["pixel_values"], output_hidden_states=True).hidden_states[-2]  # full tower
        visual = peer.proj(hidden[:, 1:])  # (B, P, d): patch tokens, no [cls]
        emb = llm.get_input_embeddings()(b["input_ids"])
        embeds = torch.cat([emb[:, :1], visual, emb[:, 1:]], dim=1)
        mask = torch.ones(2, embeds.shape[1], dtype=torch.long)
        mask[1, 1 : 1 + n] = 0  # no image: its patch positions are masked out
        ref = llm(inputs_embeds=embeds, attention_mask=mask)  # LoRA's B starts at zero: the base LLM
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    x = peer.inputs(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_mask"], b["labels"])
    m2, l2 = x.mask, x.labels
    assert torch.equal(m2, mask) and (l2[:, 1 : 1 + n] == IGNORE_INDEX).all() and torch.equal(l2[:, 1 + n :], b["labels"][:, 1:])
    lora_layers = [name for name, _ in peer.llm.named_modules() if name.endswith("lora_A")]
    assert len(lora_layers) == len(LORA_TARGETS) * llm.config.num_hidden_layers


def test_llava_gradients_reach_only_lora_and_projector(base) -> None:
    llm, vision = base
    peer = build_peer("llava", twin(llm), twin(vision), CONFIG)
    peer.train()
    peer(**batch(llm)).loss.backward()
    with_grad = {name for name, p in peer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {name for name, p in peer.named_parameters() if p.requires_grad}
    assert with_grad <= trainable
    assert any(".lora_B." in name for name in with_grad) and {"proj.0.weight", "proj.2.weight"} <= with_grad
    assert all(p.grad is None for p in llm.parameters())


@pytest.mark.parametrize("method", ["adem-vl", "memvp", "llava", "text-only"])
def test_cached_greedy_equals_full_forward_greedy(base, peers, method: str) -> None:
    llm, _ = base
    peer = peers[method]
    peer.eval()
    b = batch(llm)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    got = peer.greedy(**inputs, new_tokens=4)  # (B, 4)
    ids = b["input_ids"]
    with torch.no_grad():
        for _ in range(4):  # no cache: the whole sequence again at every step
            logits = peer(ids, torch.ones_like(ids), b["pixel_values"], b["image_mask"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.shape == (2, 4)
    assert torch.equal(got, ids[:, -4:])
    assert getattr(getattr(peer, "model", None), "memory", None) is None or peer.model.memory.keys is None  # released


def test_unknown_method_is_named(base) -> None:
    llm, vision = base
    with pytest.raises(ValueError, match="choose from text-only, adem-vl"):
        build_peer("lavin", llm, vision, CONFIG)
    with pytest.raises(ValueError, match="unknown method"):
        build_peers(llm, vision, CONFIG, methods=("adem-vl", "flamingo"))
    assert METHODS == ("text-only", "adem-vl", "adem-vl-reference", "memvp", "llava")


def test_low_rank_decoding_gives_the_tokens_of_full_forwards(base) -> None:
    """hidden_proj 8 < d 64: cached steps read V factored (rank 9); the greedy tokens are those of
    full forwards without a cache, which read it dense."""
    llm, vision = base
    peer = build_peer("adem-vl", twin(llm), twin(vision), CONFIG.replace(hidden_proj=8)).eval()
    perturb(peer)
    b = batch(llm)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    x = peer.inputs(**inputs)
    with torch.no_grad(), x.memory:
        token, mask, past = peer.prefill(x)
        steps = [token]
        for _ in range(3):
            token, mask, past = peer.decode_step(token, mask, past)
            steps.append(token)
        assert peer.model.memory._low_rank is not None and peer.model.memory._low_rank.coef_t.shape[1] == 9
    ids = b["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            logits = peer(ids, torch.ones_like(ids), b["pixel_values"], b["image_mask"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(torch.cat(steps, dim=1), ids[:, -4:])
