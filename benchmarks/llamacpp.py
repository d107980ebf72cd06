"""llama.cpp as a baseline for benchmarks/cpu_decode.py: llama-cpp-python, built from its PyPI source distribution
in a virtual environment of its own, outside the repository and apart from the project's (torch and transformers
there, llama_cpp here). Build it once (10-17 minutes on 2 cores):

    python3 -m venv ~/.cache/sparseft-llamacpp/venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" ~/.cache/sparseft-llamacpp/venv/bin/pip install --no-binary llama-cpp-python \
        llama-cpp-python numpy gguf

This file runs on both sides. Imported by cpu_decode.py (project venv, standard library only), its functions run it
again as a script with that venv's python, which does the llama.cpp work:
- `convert`: a dense HF Llama checkpoint (safetensors, no tokenizer files needed) to GGUF BF16, written with the
  `gguf` package's GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes a Llama (its tensor names and
  metadata, q and k rows permuted to llama.cpp's rotary layout, 1-D norms in F32) and a dummy SentencePiece
  vocabulary of the model's size (speed does not depend on the tokens);
- `quantize`: GGUF BF16 to Q8_0 or Q4_0 with `llama_model_quantize`, llama.cpp's own quantizer with its defaults
  (so Q4_0's output head is Q6_K, as llama-quantize makes it);
- `serve`: loads GGUF models side by side and answers greedy generation requests, one JSON line each, so that the
  caller times them in its own alternating passes;
- `memory`: loads one GGUF model in a fresh process, generates, prints its peak resident memory as JSON.

Generation is greedy over the logits (argmax), a fixed number of new tokens with no end-of-sequence check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_VENV = Path("~/.cache/sparseft-llamacpp/venv").expanduser()
QUANTS = ("BF16", "Q8_0", "Q4_0")


def build_hint(venv: Path) -> str:
    return (
        f"no working llama-cpp-python in {venv}; build it (10-17 min on 2 cores) with: python3 -m venv {venv} && "
        f'CMAKE_ARGS="-DGGML_NATIVE=ON" {venv}/bin/pip install --no-binary llama-cpp-python llama-cpp-python '
        "numpy gguf"
    )


def available(venv: Path = DEFAULT_VENV) -> bool:
    """Whether llama_cpp, gguf and numpy import in the venv: False where it is missing or its build failed."""
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    return (
        subprocess.run([python, "-c", "import gguf, llama_cpp, numpy"], capture_output=True).returncode == 0
    )


def _run(venv: Path, *args: str) -> str:
    """Run this file as a script with the venv's python; its stdout. Its stderr is shown on failure."""
    done = subprocess.run([venv / "bin" / "python", __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llamacpp.py {args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def prepare(
    dense: Path, out_dir: Path, quants: list[str], venv: Path = DEFAULT_VENV, threads: int = 2
) -> dict[str, Path] | None:
    """GGUF files of the checkpoint in `dense`, one per quantization in `quants` ("BF16", "Q8_0", "Q4_0"), in
    `out_dir` (made once, reused later; the BF16 file is made whenever one is asked for, as the others' source).
    None if the llama.cpp venv is missing or broken."""
    if not available(venv):
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {quant: out_dir / f"{dense.name}-{quant}.gguf" for quant in QUANTS}
    if not paths["BF16"].exists():
        print(f"converting {dense} to {paths['BF16']} (once)...", flush=True)
        _run(venv, "convert", str(dense), str(paths["BF16"]))
    for quant in quants:
        if not paths[quant].exists():
            print(f"quantizing to {paths[quant]} (once)...", flush=True)
            _run(venv, "quantize", str(paths["BF16"]), str(paths[quant]), quant, str(threads))
    return {quant: paths[quant] for quant in quants}


def peak_memory(
    gguf: Path, ids: list[int], new_tokens: int, threads: int, n_ctx: int, venv: Path = DEFAULT_VENV
) -> dict[str, int]:
    """Peak resident memory of a fresh process that loads `gguf` and generates `new_tokens` after `ids`
    (VmHWM: the mapped model file's pages count once touched), and the same minus its size before loading
    (after importing llama_cpp)."""
    out = _run(venv, "memory", str(gguf), ",".join(map(str, ids)), str(new_tokens), str(threads), str(n_ctx))
    return json.loads(out.strip().splitlines()[-1])


class Worker:
    """A process in the llama.cpp venv holding GGUF models side by side, generating on request."""

    def __init__(self, models: dict[str, Path], threads: int, n_ctx: int, venv: Path = DEFAULT_VENV) -> None:
        args = [str(venv / "bin" / "python"), __file__, "serve", str(threads), str(n_ctx)]
        args += [f"{name}={path}" for name, path in models.items()]
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.info: dict[str, Any] = self._reply()  # llama_cpp's version and system info
        self.last_seconds = 0.0

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited ({self.process.wait()}); its errors are above")
        return json.loads(line)

    def generate(self, name: str, ids: list[int], new_tokens: int) -> list[int]:
        """Greedy generation of exactly `new_tokens` tokens after the prompt `ids`, from an empty cache; the new
        tokens. The worker's own time for it is kept in `last_seconds`."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"model": name, "ids": ids, "new_tokens": new_tokens}) + "\n")
        reply = self._reply()
        self.last_seconds = reply["seconds"]
        return reply["tokens"]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


# ---- the llama.cpp venv's side: run as a script ----


def _read_checkpoint(dense: Path) -> dict[str, Any]:
    """The checkpoint's tensors as numpy arrays mapped from its safetensors files (bf16 as uint16: numpy has no
    bfloat16), without torch or the safetensors package."""
    import struct

    import numpy as np

    index = dense / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    dtypes = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
    tensors: dict[str, Any] = {}
    for file in files or ["model.safetensors"]:
        path = dense / file
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                tensors[name] = data[start:end].view(dtypes[info["dtype"]]).reshape(info["shape"])
    return tensors


def _permute(weight: Any, heads: int) -> Any:
    """q/k rows from HF's rotary layout (halves) to llama.cpp's (pairs), as convert_hf_to_gguf.py does."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def convert(dense: Path, out: Path) -> None:
    import gguf
    import numpy as np

    config = json.loads((dense / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"a Llama checkpoint is needed, got model_type {config.get('model_type')!r}")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    vocab = config["vocab_size"]
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name("sparseft random Llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    # A dummy SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens llama.cpp's SPM tokenizer looks up,
    # then placeholders.
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    kinds = gguf.TokenType
    types = [kinds.UNKNOWN, kinds.CONTROL, kinds.CONTROL, *[kinds.BYTE] * 256]
    tokens += [f"\u2581t{i}" for i in range(len(tokens), vocab)]
    types += [kinds.NORMAL] * (vocab - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config["num_hidden_layers"]):
        names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{ours}.weight" for hf, ours in per_layer.items()}
    tensors = _read_checkpoint(dense)
    for hf_name, array in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names[hf_name]  # a KeyError here is a tensor this converter does not know
        if name.endswith("attn_q.weight"):
            array = _permute(array, heads)
        elif name.endswith("attn_k.weight"):
            array = _permute(array, kv_heads)
        if array.ndim == 1:  # norms stay F32, as llama.cpp's converter keeps them
            f32 = (array.astype(np.uint32) << 16).view(np.float32) if array.dtype == np.uint16 else array
            writer.add_tensor(name, np.asarray(f32, dtype=np.float32))
        elif array.dtype == np.uint16:  # bf16 bits as they are
            writer.add_tensor(name, np.ascontiguousarray(array), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            bf16 = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)


def quantize(source: Path, out: Path, quant: str, threads: int) -> None:
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    ftypes = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    params.ftype = ftypes[quant]
    params.nthread = threads
    tmp = out.with_name(out.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {source} -> {quant} failed")
    os.replace(tmp, out)


def _load(path: str, threads: int, n_ctx: int) -> Any:
    from llama_cpp import Llama

    return Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)


def _generate(llm: Any, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy: the prompt in one batch, then one token at a time, each the argmax of the last logits (llama-cpp-
    python's `eval` keeps no logits unless every position's are asked for, so they are read from the context)."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()
    llm.reset()
    llm.eval(ids)
    tokens: list[int] = []
    while True:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        tokens.append(int(logits.argmax()))
        if len(tokens) == new_tokens:
            return tokens
        llm.eval(tokens[-1:])


def serve(threads: int, n_ctx: int, models: list[str]) -> None:
    """Load the models ("name=path"), then answer one JSON request per stdin line with one JSON line."""
    import llama_cpp

    # The replies go to a copy of stdout; anything else printing to fd 1 (llama.cpp's C code) goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    loaded = {name: _load(path, threads, n_ctx) for name, path in (m.split("=", 1) for m in models)}
    info = {
        "version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }
    replies.write(json.dumps(info) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        tokens = _generate(loaded[request["model"]], request["ids"], request["new_tokens"])
        replies.write(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}) + "\n")


def memory(path: str, ids: list[int], new_tokens: int, threads: int, n_ctx: int) -> None:
    import llama_cpp  # noqa: F401  (imported before the baseline, as the generation will need it)
    import numpy  # noqa: F401

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024

    before = status("VmRSS")
    _generate(_load(path, threads, n_ctx), ids, new_tokens)
    peak = status("VmHWM")
    print(json.dumps({"peak_rss": peak, "before_load": before, "peak_minus_before": peak - before}))


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "convert":
        convert(Path(args[0]), Path(args[1]))
    elif command == "quantize":
        quantize(Path(args[0]), Path(args[1]), args[2], int(args[3]))
    elif command == "serve":
        serve(int(args[0]), int(args[1]), args[2:])
    elif command == "memory":
        memory(args[0], [int(i) for i in args[1].split(",")], int(args[2]), int(args[3]), int(args[4]))
    else:
        raise SystemExit(f"unknown command {command!r}: convert, quantize, serve or memory")


if __name__ == "__main__":
    main()
