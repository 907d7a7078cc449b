"""Named adapters over peft (recsim.backbones.adapters) on the tiny random Llama: add / copy / freeze round trips,
several active adapters summing their deltas, frozen adapters untouched by an optimiser step, save / load."""

import json

import pytest
import torch
import torch.nn.functional as F

from recsim.backbones import lora as lora_ops
from recsim.backbones.adapters import NAMES_FILE, Adapters
from recsim.protocols.base import Sample

from test_llm_ranker import tiny_ranker

SAMPLES = [Sample(0, (1, 2, 3), 4), Sample(1, (5,), 6), Sample(2, (7, 8), 9)]


def flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def randomise(model, name, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_ops.lora_parameters(model, name).values():
            p.normal_(std=0.3)


def q_proj(model, layer=1):
    return model.base_model.model.model.layers[layer].self_attn.q_proj


def test_add_is_fresh_frozen_inactive_and_seeded():
    ranker = tiny_ranker()
    model, adapters = ranker.model, Adapters(ranker.model)
    before = flags(model)
    rng = torch.random.get_rng_state()
    adapters.add("s1", seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left as it was
    assert adapters.names() == ["default", "s1"] and adapters.active() == ["default"]
    new = lora_ops.lora_parameters(model, "s1")
    assert new and not any(p.requires_grad for p in new.values())
    assert {n: f for n, f in flags(model).items() if n in before} == before  # nobody else's flag changed
    assert all((p == 0).all() for n, p in new.items() if "lora_B" in n)  # a fresh LoRA is the identity ...
    assert all(p.abs().sum() > 0 for n, p in new.items() if "lora_A" in n)
    adapters.add("s2", seed=3)
    a1, a2 = adapters.snapshot("s1"), adapters.snapshot("s2")
    assert all(torch.equal(v, a2[n.replace(".s1.", ".s2.")]) for n, v in a1.items())  # ... drawn from its seed
    with pytest.raises(ValueError, match="'s1' exists already"):
        adapters.add("s1")


def test_copy_snapshot_freeze_and_trainable_round_trip():
    ranker = tiny_ranker()
    model, adapters = ranker.model, Adapters(ranker.model)
    adapters.add("s1", copy_from="default")
    default, copied = adapters.snapshot("default"), adapters.snapshot("s1")
    assert len(copied) == len(default)
    assert all(torch.equal(v, default[n.replace(".s1.", ".default.")]) for n, v in copied.items())
    randomise(model, "s1")
    assert not torch.equal(next(iter(adapters.snapshot("s1").values())), next(iter(copied.values())))
    adapters.load_snapshot("s1", copied)
    assert all(torch.equal(v, adapters.snapshot("s1")[n]) for n, v in copied.items())
    with pytest.raises(ValueError, match="not adapter 's1'"):
        adapters.load_snapshot("s1", default)
    count = adapters.trainable("s1")
    assert count == sum(p.numel() for p in copied.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(copied)
    adapters.freeze("s1")
    assert not any(p.requires_grad for p in model.parameters())
    assert adapters.bytes(["s1"]) == sum(p.numel() * 4 for p in copied.values())  # float32
    assert adapters.bytes() == adapters.bytes(["default"]) + adapters.bytes(["s1"])


def test_two_active_adapters_give_the_sum_of_their_deltas():
    ranker = tiny_ranker()
    model, adapters = ranker.model, Adapters(ranker.model)
    adapters.add("s1")
    randomise(model, "s1")
    model.eval()  # no dropout
    layer = q_proj(model)
    x = torch.randn(2, 5, layer.in_features)

    def delta(name):  # scaling · B A x, by hand
        return layer.scaling[name] * x @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T

    with torch.no_grad():
        base = layer.base_layer(x)
        adapters.activate("default", "s1")
        both = layer(x)
        adapters.activate("s1")
        only_new = layer(x)
        adapters.activate("default")
        only_default = layer(x)
    torch.testing.assert_close(both, base + delta("default") + delta("s1"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both, only_default + only_new - base, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both, only_default, atol=1e-3)


def test_activate_changes_no_requires_grad_and_names_unknown_adapters():
    ranker = tiny_ranker()
    model, adapters = ranker.model, Adapters(ranker.model)
    adapters.add("s1")
    adapters.trainable("s1")
    before = flags(model)
    adapters.activate("default", "s1")  # peft's set_adapter would make "default" trainable
    assert flags(model) == before and adapters.active() == ["default", "s1"]
    assert model.active_adapter == "default"  # PeftModel's own lookup stays a string
    with pytest.raises(ValueError, match="'nope' does not exist"):
        adapters.activate("default", "nope")


def test_a_frozen_adapter_is_bit_for_bit_unchanged_by_an_optimiser_step():
    ranker = tiny_ranker()
    model, adapters = ranker.model, Adapters(ranker.model)
    adapters.add("s1")
    adapters.activate("default", "s1")
    adapters.trainable("s1")
    frozen, start = adapters.snapshot("default"), adapters.snapshot("s1")
    params = [p for p in ranker.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)  # decay would move a frozen tensor that it saw
    out = ranker.answer_logits(ranker.collate(SAMPLES))
    F.cross_entropy(out["logits"], out["targets"]).backward()
    opt.step()
    assert all(torch.equal(v, adapters.snapshot("default")[n]) for n, v in frozen.items())
    assert any(not torch.equal(v, adapters.snapshot("s1")[n]) for n, v in start.items())


def test_save_and_load_round_trip_every_adapter_in_peft_format(tmp_path):
    ranker = tiny_ranker()
    adapters = Adapters(ranker.model)
    adapters.add("stage1")
    randomise(ranker.model, "stage1")
    adapters.save(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()  # "default" at the root, as before
    assert (tmp_path / "stage1" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / NAMES_FILE).read_text()) == ["default", "stage1"]
    assert Adapters.saved_names(tmp_path) == ["default", "stage1"]
    other = tiny_ranker(nonzero_b=False)  # other LoRA weights, same base
    restored = Adapters(other.model)
    restored.add("stage1")
    restored.load(tmp_path)
    for name in ("default", "stage1"):
        saved, got = adapters.snapshot(name), restored.snapshot(name)
        assert saved.keys() == got.keys() and all(torch.equal(saved[n], got[n]) for n in saved)
    # an adapter the model lacks is skipped, one the folder lacks is left as it is
    third = tiny_ranker(nonzero_b=False)
    third_adapters = Adapters(third.model)
    third_adapters.add("short")
    short = third_adapters.snapshot("short")
    third_adapters.load(tmp_path)
    assert third_adapters.names() == ["default", "short"]
    assert all(torch.equal(v, third_adapters.snapshot("short")[n]) for n, v in short.items())


def test_save_load_with_item_token_rows_on_default(tmp_path):
    """With semantic-ID token rows trained on "default" (peft's trainable-token deltas), extra LoRA-only adapters
    still save and load (peft's own save_pretrained raised KeyError for them) and round-trip exactly."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from recsim.backbones.adapters import Adapters
    from recsim.backbones.lora import add_lora

    cfg = LlamaConfig(vocab_size=70, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    lora = OmegaConf.create({"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    model = add_lora(LlamaForCausalLM(cfg), lora, trainable_tokens=[66, 67, 68, 69])
    ad = Adapters(model)
    ad.add("stage1", seed=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".stage1." in n or "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if ".stage1." in n or "trainable_tokens_delta" in n}
    ad.save(tmp_path / "a")
    assert (tmp_path / "a" / "stage1" / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in before:
                p.zero_()
    ad.load(tmp_path / "a")
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
