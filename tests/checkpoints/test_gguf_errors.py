"""Bad GGUF files and what a user sees: one line naming the problem, exit 2, never a traceback; and a GGUF
file's chat template reaching `LLM.chat`."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q

from graphcap import LLM, SamplingParams
from graphcap.cli import main
from graphcap.errors import UserError
from graphcap.executor.loader import resolve_source

from .gguf_files import write_gguf

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def good_file(tmp_path_factory, kit):
    return write_gguf(kit.build_hf("llama_gqa", seed=1), tmp_path_factory.mktemp("g") / "good.gguf", Q.Q8_0)


def _cli_error(capsys, path) -> str:
    code = main(["generate", "--model", str(path), "--prompt-ids", "1,2,3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("graphcap: error: "), err
    return err


def test_truncated_file(tmp_path, good_file, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 3])
    assert "truncated or corrupt" in _cli_error(capsys, bad)


def test_not_a_gguf_file(tmp_path, capsys):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    assert "not a readable GGUF file" in _cli_error(capsys, bad)


def test_missing_file(tmp_path, capsys):
    assert "does not exist" in _cli_error(capsys, tmp_path / "nope.gguf")


def test_unknown_architecture(tmp_path, kit, capsys):
    path = write_gguf(kit.build_hf("llama_gqa"), tmp_path / "falcon.gguf", Q.F32, arch="falcon")
    assert "architecture 'falcon' is not supported" in _cli_error(capsys, path)


def test_unknown_tensor_type(tmp_path, good_file, capsys):
    """A tensor whose type id no GGUF reader knows (patched into the file's tensor table)."""
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(good_file)).tensors if t.tensor_type == Q.Q8_0)
    data = bytearray(good_file.read_bytes())
    # tensor-info record: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    start = data.index(tensor.name.encode()) + len(tensor.name) + 4 + 8 * len(tensor.shape)
    assert data[start:start + 4] == int(Q.Q8_0).to_bytes(4, "little")
    data[start:start + 4] = (200).to_bytes(4, "little")
    bad = tmp_path / "badtype.gguf"
    bad.write_bytes(bytes(data))
    print(_cli_error(capsys, bad))
    assert "200" in _cli_error(capsys, bad)


def test_vocabulary_embedding_mismatch(tmp_path, kit):
    import gguf

    path = write_gguf(kit.build_hf("llama_gqa"), tmp_path / "v.gguf", Q.F32)
    # Same file, but declaring a vocabulary size the embedding does not have.
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "mismatch.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    w.add_vocab_size(300)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="embedding has 256 rows but the vocabulary has 300"):
        resolve_source(str(tmp_path / "mismatch.gguf"))


def test_missing_chat_template(good_file):
    with LLM(str(good_file), kv_cache_tokens=256, graph_decode="eager", graph_prefill="eager") as llm, pytest.raises(UserError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_chat_uses_the_files_template(tmp_path, kit):
    """The GGUF's template renders the prompt, and the turn-end token (here "ab", id 255) stops generation."""
    path = write_gguf(kit.build_hf("llama_gqa", seed=1), tmp_path / "chat.gguf", Q.F32,
                      chat_template=CHATML.replace("<|im_end|>", "ab"))
    with LLM(str(path), kv_cache_tokens=512, graph_decode="eager", graph_prefill="eager") as llm:
        msgs = [{"role": "user", "content": "hi"}]
        out = llm.chat(msgs, SamplingParams(max_new_tokens=4))[0]
        expected = llm.tokenizer.encode("<|im_start|>user\nhiab\n<|im_start|>assistant\n", add_special_tokens=False)
        assert out.prompt_token_ids == expected
        ref = llm.generate(prompt_token_ids=[expected], sampling_params=SamplingParams(
            max_new_tokens=4, stop_token_ids=[255]))[0]
        assert out.token_ids == ref.token_ids
