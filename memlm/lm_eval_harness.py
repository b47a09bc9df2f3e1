"""memlm as a model of EleutherAI's lm-evaluation-harness (`lm_eval`, the optional `eval` extra).

    from memlm.lm_eval_harness import MemlmLM       # also registers the name "memlm"
    lm = MemlmLM("runs/xl")                          # a run, a checkpoint or a `memlm export --hf` directory
    lm_eval.simple_evaluate(model=lm, tasks=["wikitext"])

or `memlm lm-eval RUN --tasks TASK ... [--include-path DIR]` (memlm.cli.lm_eval).

How a memory model is scored: every request is one row that starts from a fresh state and is
read from its first token, `seq_len` tokens at a time, with the state carried from segment to
segment, as `memlm eval` and training read a document. So a memory model sees the whole earlier
document (within what its memory keeps), not a window of it:

- `loglikelihood_rolling(text)`: the log-probability of every token of the text after the
  end-of-document token (the harness's prefix token), summed. Perplexity tasks (wikitext, ...)
  thus measure the model with its memory running across the document.
- `loglikelihood(context, continuation)`: the continuation's tokens after the end-of-document
  token and the context's, read the same way; `is_greedy` is whether each continuation token
  is the argmax. (The harness moves the context's trailing spaces to the continuation.)
- `generate_until(context, {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"})`:
  memlm's own sampler after the context (greedy unless do_sample), stopped at the `until`
  strings and at the end-of-document token.

A model without a state (no recurrent memory) scores the tokens in windows of at most `seq_len`
inputs instead: the targets are cut into blocks of `seq_len` from the end backwards, and each
block is predicted from the `seq_len` tokens before its last target, so every token is scored
once and the last ones with a full window, as the harness's own rolling windows do.

Rows of a batch are padded at their end (causal attention: padding changes no earlier logit);
requests are sorted by length into batches and the answers returned in the requests' order.
Bits per byte in the harness are its own (nats over the UTF-8 bytes of the text), which for
memlm's tokenizers are the bytes that `memlm eval` counts too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("memlm.lm_eval_harness needs lm-evaluation-harness: pip install 'memlm[eval]'") from error

from memlm.data import ByteTokenizer, Tokenizer
from memlm.device import autocast, pick_device
from memlm.model import LanguageModel
from memlm.train.sample import sample_text


def load(path: str | Path, device: torch.device) -> tuple[LanguageModel, Tokenizer, str]:
    """(model in eval mode, its tokenizer, its precision) of a run, a checkpoint or an export directory."""
    from memlm.data.tokenizers import TOKENIZER_FILE, read_tokenizer_file
    from memlm.hf.layout import CONFIG
    from memlm.train import load_model, load_tokenizer

    path = Path(path)
    if (path / CONFIG).is_file() and not (path / "checkpoints").exists():  # `memlm export --hf` output
        from memlm.hf import from_pretrained
        model = from_pretrained(path, device)
        tokenizer = read_tokenizer_file(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).is_file() else ByteTokenizer()
        return model, tokenizer, "fp32"
    model, saved = load_model(path, device)
    return model.eval(), load_tokenizer(path, saved), saved["train"].get("precision", "auto")


class MemlmLM(TemplateLM):
    """The lm-evaluation-harness model of a memlm LanguageModel (see the module docstring).

    pretrained: a run directory, a checkpoint directory, an export directory, or a LanguageModel.
    tokenizer: the model's tokenizer when `pretrained` is a LanguageModel (None = bytes).
    stateful: carry the state across segments; None = the model's own setting (its config).
    seq_len: tokens per segment (window); None = the model's seq_len.
    precision: auto, bf16 or fp32 (memlm.device.autocast); None = the run's (fp32 for a LanguageModel or an export).
    harness_options: what the harness passes every model (max_batch_size, ...), unused here.
    """

    def __init__(self, pretrained: str | Path | LanguageModel, device: str = "auto", batch_size: int | str = 1,
                 stateful: bool | None = None, seq_len: int | None = None, max_gen_toks: int = 256,
                 precision: str | None = None, tokenizer: Tokenizer | None = None, seed: int = 0, **harness_options):
        super().__init__()
        if isinstance(pretrained, LanguageModel):
            self.model = pretrained.eval()
            self._device = next(pretrained.parameters()).device
            self.tokenizer_ = tokenizer if tokenizer is not None else ByteTokenizer()
            saved_precision = "fp32"
        else:
            self._device = pick_device(device)
            self.model, self.tokenizer_, saved_precision = load(pretrained, self._device)
        self.precision = precision or saved_precision
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # "auto" -> 1
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.stateful = bool(self.model.config.stateful if stateful is None else stateful)
        self.seq_len = int(seq_len or self.model.config.seq_len)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

    # ----- what TemplateLM asks for ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eod

    @property
    def tokenizer_name(self) -> str:
        return f"memlm-{self.tokenizer_.kind}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string).tolist()

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer_.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        eod = self.eot_token_id
        rows = []
        for _, context, continuation in requests:  # a context starts a document: after an EOD, as in training
            context = list(context) if list(context[:1]) == [eod] else [eod] + list(context)
            rows.append((context + list(continuation), len(context)))
        answers = [(float(logprob.sum()), bool(greedy.all())) for logprob, greedy in self.score_rows(rows)]
        for (key, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        rows = [([self.prefix_token_id] + self.tok_encode(text), 1) for text in texts]
        answers = [float(logprob.sum()) for logprob, _ in self.score_rows(rows)]
        for text, answer in zip(texts, answers):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), answer)
        return answers

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        answers = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(options.get("do_sample", False)) and float(options.get("temperature", 1.0)) > 0
            with torch.no_grad(), autocast(self._device, self.precision):
                text, _ = sample_text(self.model, context, int(options.get("max_gen_toks", self.max_gen_toks)),
                                      float(options.get("temperature", 1.0)) if sample else 0.0,
                                      options.get("top_k") if sample else None,
                                      options.get("top_p") if sample else None, self.seed,
                                      stop_at_eod=True, stop_strings=until, tokenizer=self.tokenizer_)
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
        return answers

    # ----- scoring ---------------------------------------------------------------------------

    @torch.no_grad()
    def score_rows(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each (tokens, first) row: (log-probabilities (n - first,) float64 of tokens[first:]
        each given every token before it, whether each is the argmax (n - first,) bool)."""
        for tokens, first in rows:
            if not 1 <= first < len(tokens):
                raise ValueError(f"a request needs a context token and a token to score, got {len(tokens)} tokens "
                                 f"scored from {first}")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        answers: list = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            scored = self._stream([rows[i] for i in batch]) if self.stateful else self._windows([rows[i] for i in batch])
            for i, answer in zip(batch, scored):
                answers[i] = answer
        return answers

    def _logits(self, ids: torch.Tensor, state=None):
        with autocast(self._device, self.precision):
            out = self.model(ids, state=state)
        return out.logits.float(), out.state

    def _stream(self, rows):
        """Rows read from their first token in segments of seq_len, the state carried."""
        B, longest = len(rows), max(len(tokens) for tokens, _ in rows)
        ids = torch.full((B, longest), self.eot_token_id, dtype=torch.long)  # (B, N); padded at the end
        for b, (tokens, _) in enumerate(rows):
            ids[b, :len(tokens)] = torch.tensor(tokens)
        ids = ids.to(self._device)
        logprob = torch.empty(B, longest - 1, dtype=torch.float64, device=self._device)  # of ids[:, 1:]
        greedy = torch.empty(B, longest - 1, dtype=torch.bool, device=self._device)
        state = self.model.init_state(B, device=self._device)
        for start in range(0, longest - 1, self.seq_len):
            stop = min(start + self.seq_len, longest - 1)
            logits, state = self._logits(ids[:, start:stop], state)  # (B, t, V)
            targets = ids[:, start + 1:stop + 1]  # (B, t)
            logprob[:, start:stop] = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
            greedy[:, start:stop] = logits.argmax(-1) == targets
        return [(logprob[b, first - 1:len(tokens) - 1].cpu(), greedy[b, first - 1:len(tokens) - 1].cpu())
                for b, (tokens, first) in enumerate(rows)]

    def _windows(self, rows):
        """Targets in blocks of seq_len from the end; each block predicted from the seq_len tokens
        before its last target; all windows of the batch in one forward."""
        windows = []  # (row, input start, first target, end): targets tokens[first:end]
        for r, (tokens, first) in enumerate(rows):
            end = len(tokens)
            while end > first:
                begin = max(first, end - self.seq_len)
                windows.append((r, max(0, end - 1 - self.seq_len), begin, end))
                end = begin
        pieces: list[list] = [[] for _ in rows]
        for chunk in range(0, len(windows), self.batch_size):
            part = windows[chunk:chunk + self.batch_size]
            width = max(end - 1 - start for _, start, _, end in part)
            ids = torch.full((len(part), width), self.eot_token_id, dtype=torch.long)  # (W, t)
            for w, (r, start, _, end) in enumerate(part):
                ids[w, :end - 1 - start] = torch.tensor(rows[r][0][start:end - 1])
            logits, _ = self._logits(ids.to(self._device))  # (W, t, V)
            for w, (r, start, begin, end) in enumerate(part):
                at = slice(begin - 1 - start, end - 1 - start)  # input positions whose next token is a target
                targets = torch.tensor(rows[r][0][begin:end], device=self._device)
                row_logits = logits[w, at].double()
                pieces[r].append((begin, torch.log_softmax(row_logits, -1).gather(-1, targets[:, None])[:, 0].cpu(),
                                  (row_logits.argmax(-1) == targets).cpu()))
        answers = []
        for blocks in pieces:
            blocks.sort(key=lambda block: block[0])
            answers.append((torch.cat([b[1] for b in blocks]), torch.cat([b[2] for b in blocks])))
        return answers


register_model("memlm")(MemlmLM)


def bits_per_byte(total_logprob: float, text: str) -> float:
    """-total log-probability (nats) over the UTF-8 bytes of `text`, in bits: the harness's bits_per_byte."""
    return -total_logprob / len(text.encode("utf-8")) / math.log(2)


__all__ = ["MemlmLM", "bits_per_byte", "load"]

