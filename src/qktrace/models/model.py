"""`load_model` and `Model`: an HF causal LM, its tokenizer, its anatomy, and one-forward `Trace`s."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import DEMO_MODEL, DEMO_NAME, DEMO_SAES, parse_device, parse_dtype
from ..errors import InputError, ModelLoadError, QKTraceError
from . import tokens
from .anatomy import Anatomy
from .capture import Seam, attach_seam
from .families import ModuleHandles, family_for, module_handles, read_anatomy
from .record import Recorder, assemble, capture
from .trace import Trace

log = logging.getLogger(__name__)


class Model:
    """A loaded HF causal LM with its tokenizer and uniform anatomy. Stateless apart from the weights.

    Wrapping `hf` sets its attention implementation to qktrace's seam (HF's eager attention, bitwise, with
    hooks that only this model's traces and interventions install); other models are left as they are."""

    def __init__(self, hf: Any, tokenizer: Any = None, name: str | None = None):
        self.hf: Any = hf.eval()
        self.tokenizer: Any = tokenizer
        self.name = name or getattr(hf.config, "_name_or_path", "") or hf.config.model_type
        self.anatomy: Anatomy = read_anatomy(hf)
        self.modules: ModuleHandles = module_handles(hf)
        self.seam: Seam = attach_seam(hf, self.modules.attn)  # this model's attention seam, hooks and lock

    # -- shape facts -------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.anatomy.family

    @property
    def n_layers(self) -> int:
        return self.anatomy.n_layers

    @property
    def d_model(self) -> int:
        return self.anatomy.d_model

    @property
    def n_heads(self) -> int:
        return self.anatomy.layers[0].n_heads

    @property
    def max_positions(self) -> int | None:
        return self.anatomy.max_positions

    @property
    def device(self) -> torch.device:
        """Where prompts go in: the embedding's device."""
        return self.anatomy.W_E.device

    def checkpoint_device(self, checkpoint: int) -> torch.device:
        """The device of checkpoint c's residual (the input of layer c; the last layer's for the final one)."""
        return self.anatomy.layers[min(checkpoint, self.n_layers - 1)].device

    @property
    def attn_modules(self) -> tuple[Any, ...]:
        """The HF attention module of each layer (whose attention function is the seam)."""
        return self.modules.attn

    @property
    def blocks(self) -> tuple[Any, ...]:
        """The HF decoder block of each layer (block c's input is checkpoint c)."""
        return self.modules.blocks

    # -- tokens ------------------------------------------------------------------------------------
    def tokenize(
        self, prompt: str | Sequence[int] | Tensor, *, prepend_bos: bool | None = None, what: str = "the prompt"
    ) -> Tensor:
        """Token ids [pos] of a prompt (the tokenizer's own special tokens, e.g. BOS, included).

        `prepend_bos=True` puts the tokenizer's BOS first when it did not (SAEs trained with BOS, e.g.
        SAELens releases on GPT-2); None leaves the tokenizer's convention. A prompt longer than the
        model's positions is refused before any work. `what` names the prompt in those lines (the caller's
        name for it: "prompt B" where two are compared)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError(f"{what} is empty: give at least one token of text")
            if self.tokenizer is None:
                raise InputError(f"model '{self.name}' has no tokenizer: pass token ids instead of text")
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
        else:
            try:
                ids = torch.as_tensor(prompt, dtype=torch.long, device="cpu").reshape(-1)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise InputError("token ids must be a list of integers") from None
        if prepend_bos:
            bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
            if bos is None:
                raise InputError(f"the SAEs want a BOS token first but model '{self.name}' has none: pass token ids")
            if ids.numel() == 0 or int(ids[0]) != bos:
                ids = torch.cat([torch.tensor([bos], dtype=torch.long, device="cpu"), ids.cpu()])
        if ids.numel() == 0:
            raise InputError(f"{what} is empty: give at least one token")
        vocab = self.anatomy.W_E.shape[0]
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise InputError(f"token ids must lie in 0..{vocab - 1} for model '{self.name}': {what} holds {bad}")
        limit = self.max_positions
        if limit is not None and ids.numel() > limit:
            raise InputError(
                f"{what} is {ids.numel():,} tokens but model '{self.name}' takes at most {limit:,} positions: "
                "shorten it"
            )
        return ids.to(self.device)

    def str_tokens(self, ids: Sequence[int] | Tensor) -> tuple[str, ...]:
        """Each token's text, decoded alone (special tokens kept): `to_string([i], special_tokens=True)`."""
        flat = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        return tuple(self.to_string([int(i)], special_tokens=True) for i in flat)

    def to_string(self, ids: Sequence[int] | Tensor, *, special_tokens: bool) -> str:
        """Text of token ids; the caller says whether special tokens stay (`tokens.to_string`)."""
        return tokens.to_string(self, ids, special_tokens=special_tokens)

    def to_single_token(self, token: str | int, what: str = "token") -> int:
        """The one token id a string (e.g. ' Sally') or an id names, checked against the vocabulary
        (`tokens.single_token`); `what` names it in the one-line error ("answer", "watched token")."""
        return tokens.single_token(self, token, what)

    def token_id(self, text: str | int) -> int:
        """`to_single_token(text)`: the name this method had first."""
        return tokens.single_token(self, text)

    # -- one forward -------------------------------------------------------------------------------
    def forward(self, ids: Tensor, last_only: bool = False) -> Tensor:
        """Plain logits [pos, vocab] (or [1, vocab] with `last_only`) for token ids [pos]; hooks active
        around the call apply."""
        with torch.no_grad():
            kw = {"logits_to_keep": 1} if last_only else {}
            return self.hf(input_ids=ids.reshape(1, -1).to(self.device), use_cache=False, **kw).logits[0]

    def run(self, prompt: str | Sequence[int] | Tensor, *, prepend_bos: bool | None = None) -> Trace:
        """One forward pass with hooks on the real HF modules, returning every cache qktrace uses."""
        ids = self.tokenize(prompt, prepend_bos=prepend_bos)
        rec = Recorder()
        with capture(self.modules, self.anatomy, rec):
            logits = self.forward(ids, last_only=True)
        return assemble(self.anatomy, rec, ids, self.str_tokens(ids), logits[-1])


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not name.endswith(".json")


def _load_tokenizer(source: str):
    """AutoTokenizer, except that a generic tokenizers-backed file is loaded as saved (v5's AutoTokenizer
    would otherwise rebuild it as the family's own tokenizer class, e.g. Qwen2's)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = Path(source) / "tokenizer_config.json"
    if cfg.is_file():
        cls = json.loads(cfg.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source)


def public_name(name_or_path: str | os.PathLike[str], full_path: bool = False) -> str:
    """What files call a model (or an SAE set): a hub id as given; a local folder by the hub id its
    config.json records (`_name_or_path`) or else by the folder's name; the embedded demo "demo". `full_path`: a local
    folder's full path instead (the user asked: a path names the machine, and an upload publishes it)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        return text
    if full_path:
        return str(path.resolve())
    if path.resolve() in (DEMO_MODEL.resolve(), DEMO_SAES.resolve()):
        return DEMO_NAME
    try:
        recorded = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError, RecursionError):  # a damaged config names nothing
        recorded = None
    if (
        isinstance(recorded, str)
        and _looks_like_hub_id(recorded)
        and not recorded.startswith((".", "/", "~"))
        and not Path(recorded).expanduser().exists()
    ):
        return recorded
    return path.resolve().name or text


def model_source(name_or_path: str | os.PathLike[str], shown: str | None = None) -> str:
    """The local directory or hub id a model loads from; ModelLoadError (one line) for a path that is not
    a save_pretrained directory. Cheap: front ends call it before any heavy work."""
    shown = shown or str(name_or_path)
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{shown}' has no config.json: point at a save_pretrained directory")
        return str(path)
    if str(name_or_path).startswith((".", "/", "~")) or not _looks_like_hub_id(str(name_or_path)):
        raise ModelLoadError(f"model path '{shown}' does not exist: give a local directory or a hub id like 'gpt2'")
    return str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    *,
    device_map: str | dict[str, Any] | None = None,
    name: str | None = None,
    full_path: bool = False,
) -> Model:
    """Load an HF causal LM (eager attention, so patterns are exposed) and its tokenizer.

    `name_or_path`: a `save_pretrained` directory or a hub id. `dtype`: float32, bfloat16 or float16
    (decompositions accumulate in float32 either way). `device`: cpu, cuda, cuda:N or auto.
    `device_map`: spread the layers over devices with accelerate (e.g. "auto", or {"model.layers.0": 0,
    ...}); each layer's decomposition then runs on that layer's device. `name`: what graphs call it
    (default `public_name`: the hub id or the folder's name; `full_path`: a local folder's full path)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    target = parse_device(device) if device_map is None else None
    shown = name or str(name_or_path)
    source = model_source(name_or_path, shown)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:  # OSError, ValueError, and JSON or type errors from a damaged config.json
        raise ModelLoadError(
            f"could not load model '{shown}': {_first_line(e)} Check the name, or give a local save_pretrained "
            "directory"
        ) from None
    family_for(getattr(config, "model_type", "") or "")  # fail fast on unsupported families, before weights
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": "eager"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        hf: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as e:
        raise ModelLoadError(f"device_map needs accelerate ({_first_line(e)}): pip install accelerate") from None
    except Exception as e:  # truncated or corrupt weights raise safetensors' own error types
        raise ModelLoadError(
            f"could not load weights of '{shown}': {_first_line(e)} Re-download or re-save the model"
        ) from None
    if target is not None:
        hf.to(target)
    _check_finite(hf, shown)
    try:
        tokenizer = _load_tokenizer(source)
    except Exception as e:
        log.warning("no tokenizer for %s (%s); prompts must be token ids", shown, _first_line(e))
        tokenizer = None
    try:
        return Model(hf, tokenizer, name=name or public_name(name_or_path, full_path))
    except QKTraceError:
        raise
    except (AttributeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"model '{shown}' does not have the layout of its family: {e}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split())[:200] if text else type(e).__name__


def _check_finite(hf: Any, name: str) -> None:
    """NaN or infinite weights make every decomposition meaningless: refuse them, naming the tensor."""
    for pname, param in hf.named_parameters():
        if param.is_floating_point() and param.device.type != "meta" and not bool(torch.isfinite(param).all()):
            raise ModelLoadError(
                f"model '{name}' has NaN or infinite values in {pname}: re-download or re-save the weights"
            )
