"""The ``prepare_data`` node: read, validate, split and render the three tasks' datasets.

Modules, in the order the node uses them: ``io`` (read rows from a file or a Hugging Face dataset),
``function_calling`` / ``math_tasks`` (parse and validate each task's formats), ``synthetic`` (the
offline generators), ``split`` (stratified splits and leakage removal), ``render`` (each model's own
chat template), ``report`` (stats.json and summary.md) and ``node`` (``build`` / ``key_inputs``).
"""

from dagtune.data.errors import DataError

__all__ = ["DataError"]
