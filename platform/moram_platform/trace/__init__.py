"""TRACE: data, tokenisation, task metrics and evaluation profiles."""
from .data import (
    KNOWN_GAPS,
    SPLITS,
    STANDARD_CL_TASKS,
    TRACE_ORDER,
    TraceDataError,
    TraceExample,
    available_tasks,
    load_labels,
    load_split,
    validate_tasks,
)
from .evaluate import PROFILES, EvaluationProfile, evaluate_task, generate_answers, get_profile
from .task_metrics import (
    ANSWER_EXTRACTORS,
    LENIENT_EXTRACTION,
    SCORINGS,
    TASK_METRIC,
    accuracy,
    edit_similarity,
    rouge_l,
    sari,
    score_task,
)
from .tokenize import (
    IGNORE_INDEX,
    GenerationCollator,
    TokenizationConfig,
    TokenizedExample,
    TrainingCollator,
    pad_for_generation,
    pad_for_training,
    tokenize_example,
)
