"""Hugging Face model of an exported memlm model (remote code for `trust_remote_code=True`).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
    ids = model.generate(input_ids, max_new_tokens=64, do_sample=False)   # input_ids (B, T) -> (B, T + 64)

`memlm export RUN --hf OUT` copies this file into OUT. It wraps memlm's LanguageModel, so the
**memlm package must be installed** wherever it runs (`pip install memlm`, or the checkout's
`pip install -e .`); it needs transformers v5.

Memory between generation steps: a memlm model carries a `memlm.State` from one piece of a
stream to the next (a key/value cache, Transformer-XL memory, compressed memory, kNN stores,
...). `MemlmCache`, a `transformers.Cache`, holds that State; `generate` passes it from step to
step as `cache`. The first forward (prefill) reads the whole prompt into a fresh State, exactly
as `memlm.generate` does (memory rolls at segment boundaries, so a prompt longer than a segment
is read with memory); every later step feeds only the tokens the State has not read yet.
Padding is not supported: memlm streams have none, so an attention mask must be all ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from memlm.model import LanguageModel
from memlm.state import State

from .configuration_memlm import MemlmConfig


class MemlmCache(Cache):
    """A transformers Cache holding one memlm State (None until the first forward fills it).

    Hugging Face caches hold per-layer keys and values; memlm's State holds whatever the model's
    memory mechanisms carry (memlm.state), so this cache has no HF layers and answers the
    length questions generate asks from the State: `get_seq_length()` is the number of stream
    positions read so far (`State.position`). It cannot be cropped (a recurrent memory cannot
    forget its last tokens), so assisted decoding and contrastive search are not supported."""

    def __init__(self, state: State | None = None):
        super().__init__(layers=[])
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else self.state.position

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # a stream has no end

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a memlm State cannot forget its last tokens (its memory has rolled)")

    def reset(self) -> None:
        self.state = None

    # ----- rows (beam search, num_return_sequences) ------------------------------------
    def _rows(self, index: torch.Tensor) -> None:
        """Keep (and repeat) the State's rows `index` (R,) in that order."""
        if self.state is None:
            return
        if self.state.stores:
            raise NotImplementedError("the rows of a State with kNN stores cannot be selected or repeated")
        s = self.state
        take = lambda t: t.index_select(0, index.to(t.device))  # noqa: E731
        self.state = State(s.position, take(s.row_start), [layer.map(take) for layer in s.layers], s.masked, {})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self._rows(torch.arange(self.state.batch_size).repeat_interleave(repeats))


@dataclass
class MemlmCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus memlm's auxiliary training losses (span penalty, compression)."""

    aux_loss: torch.Tensor | None = None


class MemlmPreTrainedModel(PreTrainedModel):
    config_class = MemlmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_cache_class = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Initialise what loading left unset: derived buffers that no state dict holds (rotary
        tables: `reset_buffers`, recomputed), and weights by memlm's own init (GPT-2 style)."""
        if hasattr(module, "reset_buffers"):
            buffer = next(module.buffers(recurse=False), None)
            module.reset_buffers(device=buffer.device if buffer is not None and buffer.device.type != "meta" else None)
            return
        model = getattr(self, "model", None)
        if isinstance(model, LanguageModel):
            model._init_weights(module)


class MemlmForCausalLM(MemlmPreTrainedModel, GenerationMixin):
    """memlm's LanguageModel (`self.model`) behind the Hugging Face causal-LM interface.

    forward(input_ids (B, T), labels=None, cache=None) -> logits (B, T, vocab): without a cache
    (and without use_cache=True) it is LanguageModel.forward(input_ids) with no state; with one
    it reads input_ids after what the cache's State has read and returns the cache advanced."""

    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: MemlmConfig):
        super().__init__(config)
        self.model = LanguageModel(config.memlm_config())
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """PreTrainedModel.from_pretrained, then what memlm's own loading does after the weights
        are in: learned adaptive spans clamped to range (the load_state_dict hook that memlm
        relies on is not called by transformers' loader)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.model.after_optimizer_step()
        return loaded

    # ----- embeddings (for tools that tie or resize them) ------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.head = value

    # ----- generation ------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: prepare_inputs_for_generation makes a MemlmCache

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: Cache | None = None, attention_mask: torch.Tensor | None = None,
                                      use_cache: bool = True, past_key_values: Cache | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """The forward's inputs for the next generation step: with a cache, only the tokens of
        input_ids (B, T) that its State has not read (the whole prompt first, then one token a step)."""
        cache = cache if cache is not None else past_key_values
        if not use_cache:  # no state: the whole sequence every step, as one stateless pass
            return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if not isinstance(cache, MemlmCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"memlm models carry their memory in a MemlmCache, not a {type(cache).__name__}")
            cache = MemlmCache()
        seen = cache.get_seq_length()
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        elif seen:  # input_ids is the whole sequence, the cache holds its first `seen` positions
            input_ids = input_ids[:, seen:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": True}

    # ----- forward ---------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, past_key_values: Cache | None = None,
                **kwargs: Any) -> MemlmCausalLMOutput | tuple:
        """input_ids (B, T) -> logits (B, T, vocab). labels (B, T): the input ids themselves (-100
        = ignored); the loss is the mean next-token cross-entropy in nats, shifted here as HF does.
        cache / use_cache=True: read the ids after the State the cache holds (a fresh one if none),
        and return the cache holding the State after them."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("memlm models take no padding: give rows of equal length (attention_mask all ones)")
        cache = cache if cache is not None else past_key_values
        stateful = cache is not None or bool(use_cache)
        if stateful and not isinstance(cache, MemlmCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"memlm models carry their memory in a MemlmCache, not a {type(cache).__name__}")
            cache = MemlmCache()
        state = None
        if stateful:
            state = cache.state if cache.state is not None else self.model.init_state(input_ids.shape[0],
                                                                                    device=input_ids.device)
        out = self.model(input_ids, state=state)
        if stateful:
            cache.state = out.state
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()  # (B, T - 1, V): position t predicts label t + 1
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        output = MemlmCausalLMOutput(loss=loss, logits=out.logits, cache=cache if stateful else None,
                                     aux_loss=out.aux_loss)
        return output if return_dict is not False else output.to_tuple()


__all__ = ["MemlmCache", "MemlmCausalLMOutput", "MemlmForCausalLM", "MemlmPreTrainedModel"]
