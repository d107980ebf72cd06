"""The lm-evaluation-harness bridge, offline: lm-eval runs tasks defined by YAMLs over local files, so everything
here runs without the network; the hub-hosted tasks themselves (hellaswag, gsm8k, ...) are not run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sparseft.cli import main
from sparseft.data import mathtask
from sparseft.errors import SparseftError
from sparseft.eval import lmeval
from sparseft.eval.gsm8k import greedy_generate, gsm8k_accuracy, gsm8k_prompt

pytest.importorskip("lm_eval")

MathModel = tuple[Any, Any, list[dict[str, str]], Path]

# lm-eval's own gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml) pointed at local files of the bundled task.
TASK_YAML = """\
task: local_math
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  max_gen_toks: 120
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
"""


@pytest.fixture(scope="module")
def task_dir(math_model: MathModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    mathtask.write_jsonl(math_model[2], root / "test.jsonl")
    mathtask.write_jsonl(mathtask.generate(20, "train"), root / "train.jsonl")
    (root / "local_math.yaml").write_text(
        TASK_YAML.format(train=root / "train.jsonl", test=root / "test.jsonl")
    )
    return root


def test_wrapped_model_loglikelihood_matches_its_own_forward(math_model: MathModel) -> None:
    from lm_eval.api.instance import Instance

    model, tok, records, _ = math_model
    context, continuation = gsm8k_prompt(records[0]["question"]), " " + records[0]["answer"]
    lm = lmeval.wrap(model, tok, batch_size=2)
    assert lm.model is model  # the very module (pruned, runtime, ...), not a copy reloaded from disk
    request = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    ((logprob, greedy),) = lm.loglikelihood([request])

    ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    expected = sum(logits[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert logprob == pytest.approx(expected, abs=1e-3)
    assert greedy  # the model memorised this answer, so it is its greedy continuation


def test_lm_eval_generation_task_agrees_with_sparseft_gsm8k(math_model: MathModel, task_dir: Path) -> None:
    model, tok, records, _ = math_model
    manager = lmeval.task_manager(task_dir, include_defaults=False)
    result = lmeval.run_tasks(model, tok, ["local_math"], num_fewshot=0, batch_size=4, manager=manager)
    assert result["results"]["local_math"]["exact_match,strict-match"] == 1.0
    assert result["n-shot"] == {"local_math": 0}
    json.dumps(result)  # plain JSON
    ours = gsm8k_accuracy(model, tok, records, batch_size=4, max_new_tokens=120, progress=False)
    assert ours["accuracy"] == 1.0


def test_lm_eval_generate_until_equals_our_greedy_generation(math_model: MathModel) -> None:
    from lm_eval.api.instance import Instance

    model, tok, records, _ = math_model
    prompts = [gsm8k_prompt(r["question"]) for r in records[:4]]
    kwargs = {"until": ["Question:", "\n\n"], "do_sample": False, "max_gen_toks": 24}
    requests = [Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(prompts)]
    theirs = lmeval.wrap(model, tok, batch_size=4).generate_until(requests)
    ours = greedy_generate(model, tok, prompts, batch_size=4, max_new_tokens=24, stop_strings=kwargs["until"])
    assert theirs == ours


def test_unknown_task_is_a_clear_error_with_a_suggestion(task_dir: Path) -> None:
    manager = lmeval.task_manager(task_dir, include_defaults=False)
    with pytest.raises(SparseftError, match="no task 'local_maths'; did you mean local_math"):
        lmeval.check_tasks(["local_maths"], manager)
    with pytest.raises(SparseftError, match="task folder .* does not exist"):
        lmeval.task_manager(task_dir / "missing")


def test_missing_lm_eval_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    with pytest.raises(SparseftError, match=r"pip install 'sparseft\[eval\]'"):
        lmeval.wrap(torch.nn.Linear(1, 1), None)


def test_cli_runs_an_lm_eval_task_on_a_saved_model(
    math_model: MathModel, task_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lm.json"
    argv = ["eval", str(math_model[3]), "--lm-eval-tasks", "local_math", "--lm-eval-include", str(task_dir)]
    assert main([*argv, "--num-fewshot", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (
        result["task"] == "lm-eval:local_math"
        and result["seed"] == 0
        and result["model"] == str(math_model[3])
    )
    assert result["results"]["local_math"]["exact_match,strict-match"] == 1.0
    assert result["protocol"]["harness"] == "lm-evaluation-harness"


def test_wrap_warns_when_the_model_would_not_stop_at_the_tokenizers_eos(math_model: MathModel) -> None:
    import transformers

    from sparseft.demo.tiny import tiny_config

    tok = math_model[1]
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(tok), eos_token_id=5))
    with pytest.warns(UserWarning, match="does not hold the tokenizer's EOS"):
        lmeval.wrap(model, tok)


def test_task_data_that_cannot_be_loaded_is_one_error_naming_the_local_way(
    math_model: MathModel, tmp_path: Path
) -> None:
    model, tok, _, _ = math_model
    missing = tmp_path / "nowhere"
    (tmp_path / "local_math.yaml").write_text(
        TASK_YAML.format(train=missing / "train.jsonl", test=missing / "test.jsonl")
    )
    manager = lmeval.task_manager(tmp_path, include_defaults=False)
    with pytest.raises(
        SparseftError, match="could not load the data of local_math.*--lm-eval-include"
    ) as info:
        lmeval.run_tasks(model, tok, ["local_math"], num_fewshot=0, limit=1, manager=manager)
    assert "\n" not in str(info.value)
