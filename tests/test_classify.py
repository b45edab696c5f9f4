"""The linear-weight rule on the tensor names of real architectures (built offline, random init).

The ground truth comes from the module types: the weight of every `nn.Linear` (and GPT-2's
`Conv1D`, a linear layer with a transposed weight) is projected; embeddings, norms, conv kernels
and biases are not.
"""

from __future__ import annotations

import pytest
import torch

from mergestream.io.safetensors_stream import TensorSpec
from mergestream.methods.classify import LinearRule, classify

transformers = pytest.importorskip("transformers")


def _linear_weight_names(model: torch.nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def _tiny_models():
    t = transformers
    yield (
        "bert",
        t.BertModel(
            t.BertConfig(
                vocab_size=50,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=20,
            )
        ),
    )
    yield (
        "clip-vision",
        t.CLIPVisionModel(
            t.CLIPVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        ),
    )
    yield (
        "gpt2",
        t.GPT2LMHeadModel(
            t.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=20)
        ),
    )
    yield (
        "llama",
        t.LlamaForCausalLM(
            t.LlamaConfig(
                vocab_size=50,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                tie_word_embeddings=False,
            )
        ),
    )
    yield (
        "t5",
        t.T5Model(
            t.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
        ),
    )


@pytest.mark.parametrize(
    ("arch", "model"), list(_tiny_models()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_default_rule_selects_exactly_the_linear_weights(arch, model):
    state = model.state_dict()
    roles = classify((n, TensorSpec(t.dtype, tuple(t.shape))) for n, t in state.items())
    projected = {n for n, role in roles.items() if role == "projected"}
    expected = _linear_weight_names(model) & set(state)
    assert projected == expected, (arch, sorted(projected ^ expected))
    # the architectures' embedding tables are 2-D and must not be projected
    embeddings = {n for n, t in state.items() if t.ndim == 2 and n not in expected}
    assert embeddings, arch


def test_include_and_exclude_override_the_default():
    specs = {
        "model.embed_tokens.weight": TensorSpec(torch.float32, (10, 4)),
        "layers.0.q_proj.weight": TensorSpec(torch.float32, (4, 4)),
        "layers.0.norm.weight": TensorSpec(torch.float32, (4,)),
        "position_ids": TensorSpec(torch.int64, (1, 4)),
    }
    assert classify(specs.items()) == {
        "model.embed_tokens.weight": "added",
        "layers.0.q_proj.weight": "projected",
        "layers.0.norm.weight": "added",
        "position_ids": "copied",
    }
    rule = LinearRule(include=r"embed_tokens", exclude=r"q_proj")
    roles = classify(specs.items(), rule)
    assert roles["model.embed_tokens.weight"] == "projected"
    assert roles["layers.0.q_proj.weight"] == "added"
    assert roles["layers.0.norm.weight"] == "added"  # include never makes a 1-D tensor projected


def test_invalid_regex_is_reported():
    with pytest.raises(ValueError, match="project_include: invalid regular expression"):
        LinearRule(include="(")
