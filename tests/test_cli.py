"""The ``turboquant`` command line, driven through subprocesses on files made here."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_python

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def cli(*args, timeout=300):
    return run_python("-m", "turboquant", *map(str, args), timeout=timeout)


def ok(*args):
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return result


def report(*args):
    return json.loads(ok(*args, "--json", "--quiet").stdout)


def failure(*args, code=1):
    result = cli(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or code == 2, result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, 48))
    base = centres[rng.integers(0, 64, 3000)] + rng.standard_normal((3000, 48))
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    queries = base[:50] + 0.05 * rng.standard_normal((50, 48)).astype(np.float32)
    np.save(folder / "base.npy", base)
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", np.argsort(-(queries @ base.T), axis=1)[:, :10])
    return folder


def test_info():
    assert "kernels:" in ok("info").stdout
    data = report("info")
    assert data["version"] and "numpy" in data["extras"] and data["threads"] >= 1


def test_bare_module_prints_the_table_and_the_summary():
    result = run_python("-m", "turboquant", "--n", "500", "--dim", "32")
    assert result.returncode == 0, result.stderr
    assert "TurboQuantMSE distortion" in result.stdout and "turboquant index build" in result.stdout


def test_compress_decompress_inspect(vectors):
    out = vectors / "base.tq"
    data = report("compress", vectors / "base.npy", "-o", out, "--bits", "4")
    assert data["vectors"] == 3000 and data["bytes_out"] < data["bytes_in"] / 6
    assert 0.005 < data["relative_mse"] < 0.015   # 4-bit distortion is 0.0095 for unit vectors
    back = vectors / "back.npy"
    report("decompress", out, "-o", back)
    restored, original = np.load(back), np.load(vectors / "base.npy")
    assert restored.shape == original.shape and np.mean(np.sum((restored - original) ** 2, axis=1)) < 0.015
    described = report("inspect", out)
    assert described["kind"] == "MSECodes" and described["valid"]
    assert "MSECodes" in ok("inspect", out).stdout


def test_fvecs_input(vectors):
    base = np.load(vectors / "base.npy")[:100]
    rows = np.hstack([np.full((100, 1), 48, dtype="<i4").view("<f4"), base]).astype("<f4")
    rows.tofile(vectors / "base.fvecs")
    data = report("compress", vectors / "base.fvecs", "-o", vectors / "f.tq", "--bits", "2")
    assert data["vectors"] == 100 and data["dim"] == 48


def test_index_build_search_eval(vectors):
    index = vectors / "base.index"
    data = report("index", "build", vectors / "base.npy", "-o", index, "--bits", "4")
    assert data["vectors"] == 3000
    found = report("index", "search", index, vectors / "queries.npy", "-k", "10", "-o", vectors / "ids.npy")
    ids, scores = np.load(vectors / "ids.npy"), np.load(found["scores"])
    assert ids.shape == scores.shape == (50, 10) and (np.diff(scores, axis=1) <= 0).all()
    quality = report("index", "eval", index, vectors / "queries.npy", "--truth", vectors / "truth.npy")
    assert quality["recall_at_10"] >= 0.85 and quality["queries_per_second"] > 0
    text = ok("index", "eval", index, vectors / "queries.npy", "--truth", vectors / "truth.npy").stdout
    assert "recall@10" in text


def test_bad_files_and_arguments(vectors, tmp_path):
    assert "no such file" in failure("compress", tmp_path / "missing.npy", "-o", tmp_path / "x.tq")
    np.save(tmp_path / "complex.npy", np.ones((4, 8), dtype=np.complex64))
    assert "dtype" in failure("compress", tmp_path / "complex.npy", "-o", tmp_path / "x.tq")
    np.save(tmp_path / "flat.npy", np.ones((2, 3, 4)))
    assert "shape" in failure("compress", tmp_path / "flat.npy", "-o", tmp_path / "x.tq")
    data = (vectors / "base.tq").read_bytes() if (vectors / "base.tq").exists() else None
    if data is None:
        ok("compress", vectors / "base.npy", "-o", vectors / "base.tq")
        data = (vectors / "base.tq").read_bytes()
    (tmp_path / "cut.tq").write_bytes(data[:len(data) // 2])
    assert "file length" in failure("inspect", tmp_path / "cut.tq") or "offset" in failure("inspect", tmp_path / "cut.tq")
    (tmp_path / "junk.tq").write_bytes(b"not a turboquant file at all")
    assert "magic" in failure("inspect", tmp_path / "junk.tq")
    assert "magic" in failure("index", "search", tmp_path / "junk.tq", vectors / "queries.npy", "-o", tmp_path / "i.npy")
    failure("compress", vectors / "base.npy", "-o", tmp_path / "x.tq", "--bits", "9", code=2)
    failure("index", "search", vectors / "base.tq", vectors / "queries.npy", "-k", "0", "-o", tmp_path / "i.npy",
            code=2)
    failure("nonsense", code=2)
    np.save(tmp_path / "q7.npy", np.ones((3, 7), dtype=np.float32))
    if not (vectors / "base.index").exists():
        ok("index", "build", vectors / "base.npy", "-o", vectors / "base.index")
    assert "shape" in failure("index", "search", vectors / "base.index", tmp_path / "q7.npy", "-o", tmp_path / "i.npy")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA limits heap memory on Linux")
def test_compress_streams_a_file_larger_than_the_memory_limit(tmp_path):
    import resource

    rows, dim = 400_000, 128           # 205 MB of float32, more than the 150 MB limit below
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(1)
    for start in range(0, rows, 50_000):
        big[start:start + 50_000] = rng.standard_normal((50_000, dim), dtype=np.float32)
    big.flush()
    del big
    limit = 150 << 20

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    import turboquant
    root = pathlib.Path(turboquant.__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = str(root)
    command = [sys.executable, "-m", "turboquant", "compress", str(tmp_path / "big.npy"), "-o",
               str(tmp_path / "big.tq"), "--bits", "2", "--json", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, preexec_fn=cap,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["vectors"] == rows
    # The same limit stops a program that reads the whole file.
    whole = subprocess.run([sys.executable, "-c", f"import numpy; numpy.load({str(tmp_path / 'big.npy')!r}) + 1"],
                           capture_output=True, text=True, env=env, preexec_fn=cap, timeout=300)
    assert whole.returncode != 0


def test_plots(vectors, tmp_path):
    pytest.importorskip("matplotlib")
    report("plot", "distortion", "-o", tmp_path / "d.png", "--n", "500", "--dim", "32")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {"presets": [{"name": "balanced", "bits_per_value": 4.39, "kl": 0.013, "top1": 0.93},
                           {"name": "compact", "bits_per_value": 3.42, "kl": 0.076, "top1": 0.86}]}
    (tmp_path / "kv.json").write_text(json.dumps(results))
    report("plot", "kv", "--results", tmp_path / "kv.json", "-o", tmp_path / "kv.png")
    assert (tmp_path / "kv.png").stat().st_size > 1000
    assert "kv eval" in failure("plot", "kv", "-o", tmp_path / "kv.png")


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("model")
    words = sorted(set(["the", "a", "of", "and", "to", "in", "is", "was", "it", "for", "on", "that", "with", "as", "by", "at", "from", "this", "be", "or", "an", "are", "which", "cache", "model", "token", "text", "key", "value", "quantized", "attention"]))
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[UNK]")
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    text = folder / "text.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(words, 200)))
    return folder


def test_kv_eval_and_generate(tiny_model_folder, tmp_path):
    data = report("kv", "eval", tiny_model_folder, tiny_model_folder / "text.txt", "--tokens", "80",
                  "--prompt", "40", "--presets", "lossless", "compact")
    by_name = {entry["name"]: entry for entry in data["presets"]}
    assert set(by_name) == {"lossless", "compact"}
    assert by_name["lossless"]["kl"] < by_name["compact"]["kl"] and by_name["lossless"]["top1"] >= 0.9
    assert by_name["compact"]["bits_per_value"] < by_name["lossless"]["bits_per_value"]
    (tmp_path / "kv.json").write_text(json.dumps(data))
    text = ok("kv", "eval", tiny_model_folder, tiny_model_folder / "text.txt", "--tokens", "60",
              "--prompt", "40", "--presets", "balanced").stdout
    assert "| balanced |" in text
    generated = report("generate", tiny_model_folder, "the cache of the model", "--max-new-tokens", "8",
                       "--preset", "lossless")
    assert generated["new_tokens"] == 8 and generated["cache_bytes"] > 0 and generated["dynamic_cache_bytes"] > 0
    streamed = ok("generate", tiny_model_folder, "the cache of the model", "--max-new-tokens", "4")
    assert "tokens/s" in streamed.stdout
    assert "no such file" in failure("generate", tmp_path / "nothing", "hello")


def readme_commands():
    text = README.read_text() if README.exists() else ""
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0] if "## Command line" in text else ""
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_command_line_examples_run(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 5
    import turboquant
    root = pathlib.Path(turboquant.__file__).resolve().parent.parent
    env = dict(os.environ)
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = str(root)
    import importlib.util
    plots = importlib.util.find_spec("matplotlib") is not None
    for line in commands:
        words = shlex.split(line)
        if words[:2] == ["turboquant", "plot"] and not plots:
            continue   # the plot extra is not installed
        if words[0] == "turboquant":
            words = [sys.executable, "-m", "turboquant", *words[1:]]
        elif words[0] == "python":
            words[0] = sys.executable
        result = subprocess.run(words, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 0, (line, result.stderr)
