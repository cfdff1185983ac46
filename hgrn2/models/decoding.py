"""Generation for ``HGRN2ForCausalLM``: a chunked prefill, then one recurrent step per token in static buffers.

``Decoder`` keeps everything a decoding step touches in tensors that never move: the token fed in, one
recurrent state per layer (updated in place, by the Triton step kernel on CUDA), the layers' lower bounds,
the finished-row mask and the logits. On CUDA a whole step (all layers, final norm, head, and for greedy
decoding the argmax and the stop-token bookkeeping) is captured once in a CUDA graph and replayed per token,
which removes the Python and kernel-launch overhead that dominates per-token latency at small batch. On the
CPU the same step runs eagerly. Decoders are cached per model and batch size, so repeated ``generate`` calls
skip the capture; a cached graph is keyed on the parameters' storage, so moving or converting the model
captures a new one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

from hgrn2.models.sampling import sample_next_token
from hgrn2.ops.reference import accumulation_dtype

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Decoder:
    """Static-buffer decoding of ``model`` for ``batch_size`` rows, replayed from a CUDA graph on CUDA.

    ``greedy=True`` folds the argmax (and the stop-token padding) into the step, so a greedy token costs one
    graph replay; otherwise the step ends at the logits and the caller samples from them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        *,
        greedy: bool,
        stop_tokens: Sequence[int] = (),
        use_cuda_graph: bool | None = None,
    ):
        weight = model.embed.weight
        device = weight.device
        if use_cuda_graph and device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs the model on a CUDA device, it is on {device}")
        self._model = weakref.ref(model)
        self.greedy = greedy
        self.use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        state_dtype = accumulation_dtype(weight.dtype)
        self.states = [
            torch.zeros(batch_size, *block.mixer.state_shape, dtype=state_dtype, device=device)
            for block in model.blocks
        ]  # one [B, H, K, V] (HGRU2) or [B, D] (HGRU1) per layer
        self.betas = None if model.lower_bounds is None else model.lower_bounds().detach().clone()  # [L, D]
        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # [B]
        self.stops = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)  # [S]
        self.logits: torch.Tensor | None = None  # [B, V], the graph's output buffer once captured
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``[B, T]`` through the chunked op into the static states; returns the last logits."""
        model = self.model
        if model.lower_bounds is not None:
            self.betas.copy_(model.lower_bounds())  # the parameters may have changed since the last call
        hidden, state = model.hidden_states(input_ids, output_state=True)
        for static, layer_state in zip(self.states, state):
            static.copy_(layer_state)
        self.finished.zero_()
        return model.lm_head(hidden[:, -1])  # [B, V]

    def choose(self, logits: torch.Tensor, sampler: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Pick the next token (argmax, or ``sampler(logits)``) into ``self.token``; finished rows repeat the
        first stop token and a row that emits a stop token is finished."""
        next_token = logits.argmax(dim=-1) if sampler is None else sampler(logits)  # [B]
        if self.stops.numel():
            next_token = torch.where(self.finished, self.stops[0], next_token)
            self.finished |= (next_token[:, None] == self.stops).any(dim=-1)
        self.token.copy_(next_token)

    def _forward(self) -> torch.Tensor:
        """The recurrent step on the static buffers: ``self.token`` → logits ``[B, V]``; states in place."""
        model = self.model
        x = model.embed(self.token)  # [B, D]
        for i, (block, state) in enumerate(zip(model.blocks, self.states)):
            beta = None if self.betas is None else self.betas[i]
            x, new_state = block.step(x, state, lower_bound=beta)
            if new_state is not state:  # the PyTorch step returns a new tensor; the Triton one updates in place
                state.copy_(new_state)
        logits = model.lm_head(model.norm(x))
        if self.greedy:
            self.choose(logits)
        return logits

    def _capture(self) -> None:
        saved = [t.clone() for t in (*self.states, self.token, self.finished)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles the kernels and lets cuBLAS settle its choices
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        for buffer, value in zip((*self.states, self.token, self.finished), saved):
            buffer.copy_(value)  # undo the warm-up steps

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Advance every row by ``self.token``; returns the logits ``[B, V]`` (with greedy, also the next token)."""
        if not self.use_cuda_graph:
            self.logits = self._forward()
            return self.logits
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits


def _parameter_key(model: torch.nn.Module) -> tuple:
    return tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())


def decoder_for(
    model: torch.nn.Module, batch_size: int, greedy: bool, stop_tokens: Sequence[int], use_cuda_graph: bool | None
) -> Decoder:
    """The cached decoder of ``model`` for these settings, or a new one (which replaces it in the cache)."""
    device_type = model.embed.weight.device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    key = (batch_size, greedy, tuple(stop_tokens), use_cuda_graph, autocast, _parameter_key(model))
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    _CACHE.pop(model, None)  # free the old buffers and graph before allocating new ones
    decoder = Decoder(model, batch_size, greedy=greedy, stop_tokens=stop_tokens, use_cuda_graph=use_cuda_graph)
    _CACHE[model] = (key, decoder)
    return decoder


def clear_decoder_cache(model: torch.nn.Module) -> None:
    """Free the cached decoding buffers (and CUDA graph) of ``model``."""
    _CACHE.pop(model, None)


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: Sequence[int],
    generator: torch.Generator | None,
    use_cuda_graph: bool | None = None,
    stop_check_interval: int | None = None,
) -> torch.Tensor:
    """The body of ``HGRN2ForCausalLM.generate`` (arguments validated there); returns ``[B, T + n]``.

    All rows finished is checked every ``stop_check_interval`` tokens (each check waits for the GPU; default
    16 with a CUDA graph, else 1); tokens decoded past that point are cut off, so the result is the same.
    """
    batch, prompt_len = input_ids.shape
    tokens = input_ids.new_empty(batch, prompt_len + max_new_tokens)  # [B, T + N]
    tokens[:, :prompt_len] = input_ids
    if max_new_tokens == 0:
        return tokens
    greedy = temperature == 0
    decoder = decoder_for(model, batch, greedy, stop_tokens, use_cuda_graph)
    interval = stop_check_interval or (16 if decoder.use_cuda_graph else 1)

    def sampler(logits):
        return sample_next_token(logits, temperature, top_k, top_p, generator)

    decoder.choose(decoder.prefill(input_ids), None if greedy else sampler)
    tokens[:, prompt_len] = decoder.token
    length = prompt_len + 1
    while length < prompt_len + max_new_tokens:
        if stop_tokens and (length - prompt_len) % interval == 0 and bool(decoder.finished.all()):
            break
        logits = decoder.step()
        if not greedy:
            decoder.choose(logits, sampler)
        tokens[:, length] = decoder.token
        length += 1
    return _cut_after_stops(tokens[:, :length], prompt_len, decoder.stops)


def _cut_after_stops(tokens: torch.Tensor, prompt_len: int, stops: torch.Tensor) -> torch.Tensor:
    """End the output at the token that finished the last row (rows that finished earlier are padded)."""
    if not stops.numel():
        return tokens
    hit = (tokens[:, prompt_len:, None] == stops).any(dim=-1)  # [B, n]
    if not bool(hit.any(dim=1).all()):
        return tokens
    first = hit.int().argmax(dim=1)  # the first stop token of each row
    return tokens[:, : prompt_len + int(first.max()) + 1]
