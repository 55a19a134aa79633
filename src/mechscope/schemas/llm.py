"""An LLM proposes the schema (optional backend of issue 7; docs/method.md §9), behind any
OpenAI-compatible chat endpoint.

Configuration by environment variables:
  MECHSCOPE_LLM_BASE_URL  e.g. http://localhost:8000/v1 (required)
  MECHSCOPE_LLM_MODEL     the model name the endpoint expects (default: "default")
  MECHSCOPE_LLM_API_KEY   sent as a bearer token when set

Two kinds of request, each a JSON message the model answers with JSON:
  1. {"task": "propose_schema", "prompts": [...]}: sample prompts with their most salient tokens
     marked as ⟦token⟧; the answer is {"spans": [names in order]}.
  2. {"task": "assign_spans", "spans": [...], "prompts": [{"id", "text"}]}: the answer is
     {"assignments": [{"id", "segments": [[span, text], ...]}]}, each prompt cut into consecutive
     segments in schema order.
Every assignment is checked as induction's are: the segments must rebuild the prompt exactly, follow
the schema's order, and cut it at token boundaries; prompts that fail are reported and excluded.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..data.dataset import BOS_SPAN, DatasetError, PromptPairDataset, Schema
from ..errors import MechscopeError
from .induction import InductionReport, assign_schema, bos_length

SYSTEM = (
    "You segment prompts of an interpretability dataset into named spans. All prompts share one schema: "
    "an ordered list of span names such that every prompt is the concatenation of its spans in that order "
    "(a span may be empty). Give the positions that play the same role the same span, and give tokens "
    "marked ⟦like this⟧ (the most important for the model's answer) spans of their own. Answer with JSON only."
)


class LLMError(MechscopeError, RuntimeError):
    """The endpoint could not be reached or answered something unusable."""


@dataclass
class LLMClient:
    base_url: str
    model: str = "default"
    api_key: str | None = None
    timeout: float = 120.0

    @classmethod
    def from_env(cls) -> "LLMClient":
        base = os.environ.get("MECHSCOPE_LLM_BASE_URL")
        if not base:
            raise LLMError("set MECHSCOPE_LLM_BASE_URL to an OpenAI-compatible endpoint (e.g. http://localhost:8000/v1)")
        return cls(base.rstrip("/"), os.environ.get("MECHSCOPE_LLM_MODEL", "default"),
                   os.environ.get("MECHSCOPE_LLM_API_KEY"))

    def ask(self, request: dict) -> dict:
        """Send one JSON request as the user message; return the JSON object the model answers."""
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": json.dumps(request, ensure_ascii=False)}],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode())
            content = reply["choices"][0]["message"]["content"]
        except urllib.error.URLError as exc:
            raise LLMError(f"{self.base_url}: request failed ({exc})") from None
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise LLMError(f"{self.base_url}: not an OpenAI-style chat completion ({type(exc).__name__}: {exc})") from None
        return parse_json_answer(content)


def parse_json_answer(content: str) -> dict:
    """The JSON object in a model's answer (tolerating code fences or prose around it)."""
    start, end = content.find("{"), content.rfind("}")
    if start < 0 or end <= start:
        raise LLMError(f"the model's answer holds no JSON object: {content[:200]!r}")
    try:
        return json.loads(content[start : end + 1])
    except json.JSONDecodeError as exc:
        raise LLMError(f"the model's answer is not valid JSON ({exc}): {content[:200]!r}") from None


def _texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in ids]


def _marked(tokens: list[str], saliency, top: int = 3) -> str:
    if saliency is None:
        return "".join(tokens)
    order = sorted(range(len(tokens)), key=lambda t: -abs(float(saliency[t])))[:top]
    return "".join(f"⟦{tok}⟧" if t in order else tok for t, tok in enumerate(tokens))


def llm_schema(
    dataset: PromptPairDataset,
    tokenizer,
    saliency: list | None,
    client: LLMClient,
    n_samples: int = 8,
    chunk: int = 25,
) -> tuple[PromptPairDataset, InductionReport]:
    """A schema proposed by the LLM from sample prompts, and its span assignment for every prompt."""
    examples = dataset.examples
    if not examples:
        raise DatasetError("cannot find a schema for an empty dataset")
    bos = bos_length(examples, tokenizer)
    tokens = [_texts(tokenizer, ex.clean[bos:]) for ex in examples]
    step = max(1, len(examples) // n_samples)
    samples = [_marked(tokens[i], None if saliency is None else saliency[i][bos:]) for i in range(0, len(examples), step)]
    proposal = client.ask({"task": "propose_schema", "prompts": samples[:n_samples]})
    names = proposal.get("spans")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise LLMError(f"the proposed schema is not a list of span names: {proposal!r}")
    names = [n for n in names if n != BOS_SPAN]
    try:
        schema = Schema(tuple([BOS_SPAN] + names))
    except DatasetError as exc:
        raise LLMError(f"the proposed schema is unusable: {exc}") from None

    assignments: dict[int, list] = {}
    for lo in range(0, len(examples), chunk):
        ids = range(lo, min(lo + chunk, len(examples)))
        answer = client.ask({"task": "assign_spans", "spans": names,
                             "prompts": [{"id": i, "text": "".join(tokens[i])} for i in ids]})
        for item in answer.get("assignments", []) if isinstance(answer, dict) else []:
            if isinstance(item, dict) and isinstance(item.get("id"), int):
                assignments[item["id"]] = item.get("segments")

    starts, excluded = {}, []
    for i in range(len(examples)):
        try:
            starts[i] = _starts(assignments.get(i), tokens[i], names, bos)
        except DatasetError as exc:
            excluded.append((i, str(exc)))
    return assign_schema(dataset, schema, starts, excluded)


def _starts(segments, tokens: list[str], names: list[str], bos: int) -> list[int]:
    """Span starts (token positions, BOS span first) from the LLM's segments of one prompt."""
    if not isinstance(segments, list) or not segments:
        raise DatasetError("no span assignment in the model's answer")
    boundaries = {0: 0}  # character offset -> token position
    offset = 0
    for t, text in enumerate(tokens):
        offset += len(text)
        boundaries[offset] = t + 1
    starts_by_name, pos, last_rank = {}, 0, -1
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 2 and all(isinstance(x, str) for x in seg)):
            raise DatasetError(f"segment {seg!r} is not a [span, text] pair")
        name, text = seg
        if name not in names:
            raise DatasetError(f"segment span '{name}' is not in the schema")
        rank = names.index(name)
        if rank <= last_rank:
            raise DatasetError(f"span '{name}' is out of the schema's order")
        if pos not in boundaries:
            raise DatasetError(f"span '{name}' starts inside a token")
        starts_by_name[name], last_rank = boundaries[pos], rank
        pos += len(text)
    if "".join(seg[1] for seg in segments) != "".join(tokens):
        raise DatasetError("the segments do not rebuild the prompt")
    # Spans the model left out are empty: they start where the next present span starts.
    starts, nxt = [0] * len(names), len(tokens)
    for k in range(len(names) - 1, -1, -1):
        nxt = starts_by_name.get(names[k], nxt)
        starts[k] = nxt
    return [0] + [bos + s for s in starts]
