"""A small gRPC streaming client for the trimode Triton model (tests, benchmarks, examples).

    with StreamingClient("127.0.0.1:8001") as c:
        r = c.generate(text_input="w5 w6 w7", max_tokens=16, mode="spec")
        print(r.text, r.finish_reason, r.counters)

One client holds one gRPC stream and runs one request at a time on it (use one client per concurrent
request). Needs ``tritonclient[grpc]``.
"""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass, field

import numpy as np

# input name -> Triton datatype (the model's config.pbtxt)
DTYPES = {"text_input": "BYTES", "input_ids": "INT32", "max_tokens": "INT32", "mode": "BYTES",
          "block_length": "INT32", "threshold": "FP32", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32",
          "seed": "INT64", "stop": "BYTES", "stream": "BOOL", "use_lora": "BOOL", "command": "BYTES",
          "messages": "BYTES", "max_thinking_tokens": "INT32", "end_think_token_id": "INT32",
          "num_subblocks": "INT32", "subblock_length": "INT32"}
_NP = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_,
       "FP64": np.float64, "INT8": np.int8, "UINT64": np.uint64}
OUTPUTS = ("text_output", "output_ids", "finish_reason", "counters")


def make_input(name: str, value, datatype: str | None = None):
    """An ``InferInput`` for ``name``; scalars become shape [1]. ``datatype`` overrides the model's type.
    ``messages`` may be given as a list of message dicts (sent as its JSON text)."""
    import tritonclient.grpc as grpcclient

    if name == "messages" and isinstance(value, list):
        value = json.dumps(value)

    datatype = datatype or DTYPES.get(name, "BYTES")
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if datatype == "BYTES":
        arr = np.array([v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values], dtype=np.object_)
    else:
        arr = np.array(values, dtype=_NP[datatype])
    inp = grpcclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr)
    return inp


@dataclass
class StreamResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    counters: dict = field(default_factory=dict)
    error: str | None = None
    chunks: int = 0                               # responses received
    start: float = 0.0
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (time since start, tokens) per response

    @property
    def ttft(self) -> float | None:
        return self.token_times[0][0] if self.token_times else None

    @property
    def latency(self) -> float | None:
        return self.token_times[-1][0] if self.token_times else None


class StreamingClient:
    def __init__(self, url: str, model: str = "trimode") -> None:
        import tritonclient.grpc as grpcclient

        self.url, self.model = url, model
        self.client = grpcclient.InferenceServerClient(url)
        self._responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self._responses.put((time.perf_counter(), result,
                                                                                   error)))
        self._ids = 0

    def send(self, inputs: list | None = None, **params) -> str:
        """Send one request (keyword inputs, or ready ``InferInput``s); returns its request id."""
        inputs = list(inputs or []) + [make_input(k, v) for k, v in params.items() if v is not None]
        self._ids += 1
        request_id = str(self._ids)
        self.client.async_stream_infer(self.model, inputs, request_id=request_id)
        return request_id

    def receive(self, timeout: float = 120.0, on_chunk=None) -> StreamResult:
        """Collect the responses of the request in flight until its last one (or an error)."""
        out = StreamResult(start=time.perf_counter())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no final response after {timeout} s (got {out.chunks} responses)")
            t, result, error = self._responses.get(timeout=left)
            out.chunks += 1
            if error is not None:
                out.error = str(error)
                return out
            ids = result.as_numpy("output_ids")
            text = result.as_numpy("text_output")
            reason = result.as_numpy("finish_reason")
            ids = [] if ids is None else ids.astype(int).tolist()
            out.token_ids.extend(ids)
            out.text += "" if text is None else text[0].decode("utf-8")
            if ids:
                out.token_times.append((t - out.start, len(ids)))
            if on_chunk is not None:
                on_chunk(ids)
            reason = "" if reason is None else reason[0].decode()
            if reason:
                out.finish_reason = reason
                counters = result.as_numpy("counters")
                if counters is not None and counters[0]:
                    out.counters = json.loads(counters[0])
                return out

    def generate(self, inputs: list | None = None, timeout: float = 120.0, on_chunk=None, **params) -> StreamResult:
        start = time.perf_counter()
        self.send(inputs, **params)
        out = self.receive(timeout, on_chunk)
        # times relative to the send, not to the first poll
        shift = out.start - start
        out.token_times = [(t + shift, n) for t, n in out.token_times]
        out.start = start
        return out

    def stats(self, timeout: float = 30.0) -> dict:
        self.send(command="stats")
        out = self.receive(timeout)
        if out.error:
            raise RuntimeError(out.error)
        return out.counters

    def close(self, cancel: bool = False) -> None:
        """Close the stream; ``cancel`` also cancels the request in flight (the server frees its pages)."""
        try:
            self.client.stop_stream(cancel_requests=cancel)
        finally:
            self.client.close()

    def __enter__(self) -> "StreamingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
