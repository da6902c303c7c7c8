"""Datasets, prompts, judges and splits for evaluating hallucination detectors.

See ``docs/evaluation.md`` for the protocol these implement: two labelling protocols (generated
and paired, never mixed), seeded splits grouped by source record, and pluggable judges.

Example:
    >>> from hf_flowcheck.data import load_halueval, paired_examples, split_records, select_split
    >>> records = load_halueval("qa", limit=200)  # doctest: +SKIP
    >>> split = split_records(records.uids, seed=0)  # doctest: +SKIP
    >>> test = paired_examples(select_split(records, split, "test"))  # doctest: +SKIP
"""

from .datasets import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    HALUEVAL_FILES,
    HUB_DATASETS,
    TASK_FIELDS,
    DataFormatError,
    Example,
    RecordList,
    load_by_name,
    load_halueval,
    load_halueval_dialogue,
    load_halueval_general,
    load_halueval_qa,
    load_halueval_summarization,
    load_hub,
    load_jsonl,
    load_selfaware,
    parse_label,
    resolve_data_dir,
)
from .judges import (
    JUDGE_TEMPLATE,
    CallableJudge,
    CausalLMJudge,
    Judge,
    JudgeResult,
    OpenAIChatJudge,
    ReferenceF1Judge,
    as_judge,
    normalize_answer,
    parse_yes_no,
    token_f1,
)
from .prompts import (
    QA_SHOT_UIDS,
    QA_SHOTS,
    TASK_TEMPLATES,
    GeneratedLabels,
    LabeledExample,
    PromptTemplate,
    clean_generation,
    format_prompt,
    generation_prompt,
    label_generated,
    make_prompt_fn,
    natural_examples,
    paired_examples,
    qa_fewshot_prompt,
)
from .splits import SPLIT_NAMES, Split, select_split, split_records

QARecord = Example
"""Alias of :class:`Example` (the record type of every task, QA included)."""

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "HALUEVAL_FILES",
    "HUB_DATASETS",
    "JUDGE_TEMPLATE",
    "QA_SHOTS",
    "QA_SHOT_UIDS",
    "SPLIT_NAMES",
    "TASK_FIELDS",
    "TASK_TEMPLATES",
    "CallableJudge",
    "CausalLMJudge",
    "DataFormatError",
    "Example",
    "GeneratedLabels",
    "Judge",
    "JudgeResult",
    "LabeledExample",
    "OpenAIChatJudge",
    "PromptTemplate",
    "QARecord",
    "RecordList",
    "ReferenceF1Judge",
    "Split",
    "as_judge",
    "clean_generation",
    "format_prompt",
    "generation_prompt",
    "label_generated",
    "load_by_name",
    "load_halueval",
    "load_halueval_dialogue",
    "load_halueval_general",
    "load_halueval_qa",
    "load_halueval_summarization",
    "load_hub",
    "load_jsonl",
    "load_selfaware",
    "make_prompt_fn",
    "natural_examples",
    "normalize_answer",
    "paired_examples",
    "parse_label",
    "parse_yes_no",
    "qa_fewshot_prompt",
    "resolve_data_dir",
    "select_split",
    "split_records",
    "token_f1",
]
