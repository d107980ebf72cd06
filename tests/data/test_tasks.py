import copy
import json

import pytest
import torch
import transformers

from sparseft.data import IGNORE_INDEX
from sparseft.data.batch import collate, model_inputs
from sparseft.data.tasks import DataConfig, build_rows, check_packing
from sparseft.demo.tiny import python_corpus, tiny_config, train_tokenizer
from sparseft.errors import SparseftError


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _labelled_text(tok, row):
    return tok.decode([i for i, lab in zip(row.input_ids, row.labels, strict=True) if lab != IGNORE_INDEX])


def test_qa_loss_on_answer_only(tok, tmp_path):
    data = _write_jsonl(
        tmp_path / "qa.jsonl", [{"question": "How many legs?", "answer": "4 + 4 = 8\n#### 8"}]
    )
    (row,) = build_rows(tok, DataConfig(dataset=data))
    assert tok.decode(row.input_ids).startswith("Question: How many legs?\nAnswer:")
    assert _labelled_text(tok, row).strip() == "4 + 4 = 8\n#### 8" + tok.eos_token
    assert row.labels[0] == IGNORE_INDEX


def test_qa_labels_everything_evaluation_expects_the_model_to_write(tok, tmp_path):
    from sparseft.eval.gsm8k import ANSWER, QUESTION

    data = _write_jsonl(
        tmp_path / "qa.jsonl", [{"question": "q", "answer": f"{n} + 1\n#### 7"} for n in (4, 40)]
    )
    for row in build_rows(tok, DataConfig(dataset=data)):
        prompt = tok(QUESTION + "q" + ANSWER)["input_ids"]  # what evaluation feeds
        assert row.input_ids[: len(prompt)] == prompt
        assert IGNORE_INDEX not in row.labels[len(prompt) :]


def test_chat_uses_prompt_and_response_fields(tok, tmp_path):
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "say hi", "response": "hi there"}])
    (row,) = build_rows(tok, DataConfig(dataset=data, format="chat"))
    assert "say hi" in tok.decode(row.input_ids)
    assert _labelled_text(tok, row) == "hi there" + tok.eos_token


def test_text_splits_long_documents_and_labels_everything(tok, tmp_path):
    text = "def f(x):\n    return x + 1\n" * 20
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    rows = build_rows(tok, DataConfig(dataset=data, format="text", seqlen=32))
    assert len(rows) > 1 and all(len(r.input_ids) <= 32 for r in rows)
    assert tok.decode([i for r in rows for i in r.input_ids]) == text + tok.eos_token
    assert all(r.labels == r.input_ids for r in rows)


def test_packing_keeps_examples_apart(tok, tmp_path):
    records = [{"question": f"what is {i}?", "answer": f"it is {i}"} for i in range(6)]
    data = _write_jsonl(tmp_path / "qa.jsonl", records)
    single = build_rows(tok, DataConfig(dataset=data))
    packed = build_rows(tok, DataConfig(dataset=data, packing=True, seqlen=64))
    assert len(packed) < len(single)
    assert sum(r.labels.count(IGNORE_INDEX) for r in packed) == sum(
        r.labels.count(IGNORE_INDEX) for r in single
    )
    # A model given the packed row must produce, for each example inside it, the logits it gives that example alone.
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok))).eval()
    batch = collate(packed[:1], tok.pad_token_id)
    assert set(model_inputs(batch)) == {"input_ids", "position_ids"}
    with torch.no_grad():
        together = model(**model_inputs(batch), use_cache=False).logits[0]
        start = 0
        for row in single[: packed[0].position_ids.count(0)]:
            alone = model(input_ids=torch.tensor([row.input_ids])).logits[0]
            end = start + len(row.input_ids)
            torch.testing.assert_close(together[start:end], alone, atol=1e-4, rtol=1e-4)
            start = end


def test_packing_puts_no_loss_on_each_examples_first_token(tok, tmp_path):
    # The position before an example's first token holds the previous example's last token, which cannot see it.
    data = _write_jsonl(
        tmp_path / "t.jsonl", [{"text": f"def f{i}(x):\n    return x + {i}\n"} for i in range(6)]
    )
    single = build_rows(tok, DataConfig(dataset=data, format="text"))
    packed = build_rows(tok, DataConfig(dataset=data, format="text", packing=True, seqlen=64))
    assert any(r.position_ids.count(0) > 1 for r in packed)
    for row in packed:
        for ident, label, position in zip(row.input_ids, row.labels, row.position_ids, strict=True):
            assert label == (IGNORE_INDEX if position == 0 else ident)
    assert sum(len(r.input_ids) for r in packed) == sum(len(r.input_ids) for r in single)


def test_packing_is_refused_for_models_without_position_ids(tok):
    # MPT's forward takes no position_ids (they vanish into **kwargs), so packed examples would see each other.
    mpt = transformers.AutoModelForCausalLM.from_config(tiny_config("mpt", vocab_size=len(tok)))
    with pytest.raises(SparseftError, match="mpt models.*drop --packing") as info:
        check_packing(mpt, DataConfig(dataset="d.jsonl", packing=True))
    assert "\n" not in str(info.value)
    check_packing(mpt, DataConfig(dataset="d.jsonl"))  # unpacked rows carry an attention_mask: fine
    # OPT takes position_ids but builds its attention mask without them
    opt = transformers.AutoModelForCausalLM.from_config(tiny_config("opt", vocab_size=len(tok)))
    with pytest.raises(SparseftError, match="opt models.*drop --packing"):
        check_packing(opt, DataConfig(dataset="d.jsonl", packing=True))
    llama = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok)))
    llama.train()
    check_packing(llama, DataConfig(dataset="d.jsonl", packing=True))
    assert llama.training  # the check's eval mode does not stick


def test_null_field_is_refused_with_row_and_field(tok, tmp_path):
    records = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": None}]
    data = _write_jsonl(tmp_path / "qa.jsonl", records)
    with pytest.raises(SparseftError, match=r"row 2 of .*qa\.jsonl has no value \(null\) in field 'answer'"):
        build_rows(tok, DataConfig(dataset=data))


def test_missing_field_is_one_clear_error(tok, tmp_path):
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "x", "a": "y"}])
    with pytest.raises(SparseftError, match="no field 'question', 'answer'.*fields are q, a"):
        build_rows(tok, DataConfig(dataset=data))


def test_all_labels_masked_is_an_error(tok, tmp_path):
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "a long question " * 20, "answer": "x"}] * 3)
    with pytest.raises(SparseftError, match="every label is masked"):
        build_rows(tok, DataConfig(dataset=data, seqlen=8))


def test_chat_responses_end_with_the_templates_end_of_turn(tok, tmp_path):
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "say hi", "response": "hi there"}])
    (row,) = build_rows(tok, DataConfig(dataset=data, format="chat"))
    assert tok.decode(row.input_ids).startswith("<|user|>say hi<|end|>\n<|assistant|>hi there<|end|>")
    assert _labelled_text(tok, row) == "hi there<|end|>\n" + tok.eos_token  # the end of turn is learnt


def test_a_chat_template_that_writes_bos_gets_no_second_one(tmp_path):
    from tokenizers.processors import TemplateProcessing

    tok = train_tokenizer(python_corpus(20_000), 300)
    bos = tok.bos_token
    # a tokenizer that adds BOS itself, and a template that writes it too (Llama-2/3, Mistral)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    tok.chat_template = "{{ bos_token }}{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Bot:"
    assert tok("x").input_ids[0] == tok.bos_token_id
    data = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hi", "response": " there"}])
    (row,) = build_rows(tok, DataConfig(dataset=data, format="chat"))
    assert row.input_ids[0] == tok.bos_token_id and row.input_ids[1] != tok.bos_token_id


def test_an_eos_already_written_is_labelled_not_doubled(tok, tmp_path):
    from tokenizers.processors import TemplateProcessing

    eos = tok.eos_token
    written = _write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": f"no{eos}"}])
    adds_eos = train_tokenizer(python_corpus(20_000), 300)
    adds_eos.backend_tokenizer.post_processor = (
        TemplateProcessing(  # add_eos_token, as some Llama tokenizers do
            single=f"$A {adds_eos.eos_token}", special_tokens=[(adds_eos.eos_token, adds_eos.eos_token_id)]
        )
    )
    plain = _write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "yes"}])
    for tokenizer, data in [(tok, written), (adds_eos, plain)]:
        (row,) = build_rows(tokenizer, DataConfig(dataset=data))
        assert row.input_ids[-1] == tokenizer.eos_token_id != row.input_ids[-2]
        assert row.labels[-1] == tokenizer.eos_token_id


def test_a_list_in_a_text_field_is_refused(tok, tmp_path):
    data = _write_jsonl(
        tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "response": "yo"}]
    )
    with pytest.raises(SparseftError, match="row 1 of .* holds a list in field 'prompt', not text"):
        build_rows(tok, DataConfig(dataset=data, format="chat"))


def test_examples_cut_or_left_out_are_counted_in_a_warning(tok, tmp_path):
    from sparseft.errors import SparseftWarning

    records = [
        {"question": "q", "answer": "a"},
        {"question": "a long question " * 20, "answer": "x"},
        {"question": "q", "answer": "a long answer " * 20},
    ]
    data = _write_jsonl(tmp_path / "qa.jsonl", records)
    with pytest.warns(
        SparseftWarning, match=r"2 of 3 examples are longer than seqlen=16 .*; 1 rows have no token"
    ):
        rows = build_rows(tok, DataConfig(dataset=data, seqlen=16))
    assert len(rows) == 2
