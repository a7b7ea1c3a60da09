"""Our GPT as a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer files), and back.

The model already uses GPT-2's parameter names, so export is a rename under `transformer.` plus a transpose
of the four projection matrices: GPT-2 stores them as Conv1D weights [in, out], nn.Linear as [out, in].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from training.model import GPT, GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Everything AutoTokenizer may read from a GPT-2 style folder; copied when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Prefixes a state dict may carry from the engine wrapping the model (DeepSpeed, torch.compile, DDP).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SCRATCHGPT_KEY = "scratchgpt"  # our own config inside config.json, so load_gpt rebuilds the exact model


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-2 key names and layouts; the tied lm_head is left out (HF ties it back to wte on load)."""
    import torch

    from training.model import sinusoidal_table

    ours = {_strip_wrappers(k): v for k, v in state_dict.items()}
    ours.pop("lm_head.weight", None)
    if "wpe.weight" not in ours and config.position == "sinusoidal":
        # A fixed table may be missing from a gathered checkpoint (buffers are not partitioned); rebuild it.
        ours["wpe.weight"] = sinusoidal_table(config.block_size, config.n_embd)
    from training.model import GPT  # the expected names come from a model on the meta device: no memory

    with torch.device("meta"):
        expected = set(GPT(config).state_dict()) - {"lm_head.weight"}
    missing, unexpected = sorted(expected - set(ours)), sorted(set(ours) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        tensor = tensor.detach().cpu()
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        hf[f"transformer.{name}"] = tensor.contiguous().clone()  # clone: safetensors refuses shared storage
    return hf


def from_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state_dict (lm_head stays out: the model ties it)."""
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the tied head, and causal-mask buffers some GPT-2 versions saved
        name = name.removeprefix("transformer.")
        ours[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor
    return ours


def tokenizer_eos_id(tokenizer_dir: Path) -> int | None:
    """The end-of-text id: tokenizer_config's eos_token, else <|endoftext|>, looked up in tokenizer.json."""
    from tokenizers import Tokenizer

    token: Any = "<|endoftext|>"
    config_file = tokenizer_dir / "tokenizer_config.json"
    if config_file.exists():
        token = json.loads(config_file.read_text()).get("eos_token") or token
        if isinstance(token, dict):
            token = token.get("content", "<|endoftext|>")
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(token)


def hf_config(config: GPTConfig, eos_id: int | None) -> dict[str, Any]:
    """GPT2Config fields describing exactly our model."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GELU, tanh approximation
        # No dropout, so the folder computes exactly what our model does; our own dropout stays in SCRATCHGPT_KEY.
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        SCRATCHGPT_KEY: config.to_dict(),
    }


def export_hf(
    state_dict: dict[str, torch.Tensor],
    config: GPTConfig,
    tokenizer_dir: Path | None,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a folder GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained load offline.

    dtype: None keeps fp32 (cast from whatever the state dict holds), else the tensors are cast to it.
    Files are written under a temporary name and renamed, so a crash never leaves a half folder looking whole.
    """
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    eos_id = None
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{tokenizer_dir / 'tokenizer.json'} not found: tokenizer_dir needs tokenizer.json")
        eos_id = tokenizer_eos_id(tokenizer_dir)
        from tokenizers import Tokenizer

        tok_vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
        if tok_vocab > config.vocab_size:
            raise ValueError(f"tokenizer in {tokenizer_dir} has {tok_vocab} tokens, the model only {config.vocab_size}")
    hf = to_hf_state_dict(state_dict, config)
    target = dtype or torch.float32
    hf = {k: v.to(target) if v.is_floating_point() else v for k, v in hf.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(hf, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / WEIGHTS_FILE)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out_dir / name)
    fields = hf_config(config, eos_id)
    fields["dtype"] = fields["torch_dtype"] = str(target).removeprefix("torch.")  # 5.x reads dtype, 4.x torch_dtype
    tmp = out_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(fields, indent=2) + "\n")
    tmp.replace(out_dir / CONFIG_FILE)  # written last: its presence marks a complete export
    return out_dir


def _config_from_hf(fields: dict[str, Any], path: Path) -> GPTConfig:
    """Our config from config.json: the exact one we stored, or derived from the GPT-2 fields."""
    from training.model import GPTConfig

    if SCRATCHGPT_KEY in fields:
        return GPTConfig.from_dict(fields[SCRATCHGPT_KEY])
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_by_inverse_layer_idx": (False, None),
        "reorder_and_upcast_attn": (False, None),
        "add_cross_attention": (False, None),
    }
    for key, allowed in unsupported.items():
        if fields.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{path}: {key}={fields[key]!r} is not GPT-2 as this model builds it")
    if fields.get("n_inner") not in (None, 4 * fields.get("n_embd", 0)):
        raise ValueError(f"{path}: n_inner={fields['n_inner']} is not 4 * n_embd")
    try:
        return GPTConfig(
            vocab_size=fields["vocab_size"],
            block_size=fields["n_positions"],
            n_layer=fields["n_layer"],
            n_head=fields["n_head"],
            n_embd=fields["n_embd"],
        )
    except KeyError as exc:
        raise ValueError(f"{path} lacks the GPT-2 field {exc}") from None


def gpt_from_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig, where: str = "state dict") -> GPT:
    """A fp32 GPT holding these weights (our names; engine prefixes and the tied head are fine).

    Refuses, naming `where`, weights that do not fit the config: missing or extra names, or other shapes.
    """
    from training.model import GPT

    ours = {_strip_wrappers(k): v for k, v in state_dict.items()}
    ours.pop("lm_head.weight", None)  # tied: loading wte sets it
    model = GPT(config)
    expected = set(model.state_dict()) - {"lm_head.weight"}
    if config.position == "sinusoidal":
        expected.discard("wpe.weight")  # a fixed table the model rebuilds; taken from the weights when there
    missing, unexpected = sorted(expected - set(ours)), sorted(set(ours) - expected - {"wpe.weight"})
    if missing or unexpected:
        raise ValueError(f"{where} does not fit the model config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    shapes = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config: {tuple(shapes[k].shape)})" for k, v in ours.items()
             if k in shapes and v.shape != shapes[k].shape]
    if wrong:
        raise ValueError(f"{where} does not fit the model config: {', '.join(wrong[:4])}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ours.items()}, strict=False)
    return model


def load_gpt(folder: str | Path) -> tuple[GPT, GPTConfig]:
    """Our model from an export folder (or any GPT-2 folder of the same architecture); safetensors only."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found: an export folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(write one with `scratchgpt export`)"
            )
    try:
        fields = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON: {exc}") from None
    config = _config_from_hf(fields, folder / CONFIG_FILE)
    try:
        hf = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{folder / WEIGHTS_FILE} could not be read as safetensors: {exc}") from None
    return gpt_from_state_dict(from_hf_state_dict(hf), config, where=str(folder / WEIGHTS_FILE)), config


def export_checkpoint(ckpt_dir: Path, out_dir: Path, tokenizer_dir: Path | None, tag: str | None = None) -> Path:
    """Join a checkpoint's ZeRO partitions into full fp32 weights and write a Hugging Face GPT-2 folder."""
    from training.checkpoint import full_state_dict
    from training.model import GPTConfig

    state, meta = full_state_dict(ckpt_dir, tag)
    gcfg = GPTConfig.from_dict(meta["model_config"])
    out = export_hf(state, gcfg, tokenizer_dir if tokenizer_dir and tokenizer_dir.is_dir() else None, out_dir)
    (Path(out) / "scratchgpt_checkpoint.json").write_text(
        json.dumps({"checkpoint": str(Path(ckpt_dir).resolve() / meta["tag"]), "step": meta["step"]}, indent=2)
    )
    return Path(out)
