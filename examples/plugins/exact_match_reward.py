"""`--reward_funcs exact_match`: 1.0 when a completion's final answer equals the row's `solution`, else 0.0.
`--reward_funcs exact_match`：补全的最终答案与该行 `solution` 一致时为 1.0，否则为 0.0。

Load it with `--external_plugins examples/plugins/exact_match_reward.py` (swift rlhf --rlhf_type gkd, or grpo):
ms-swift imports the file in every process before the trainer is built, and the trainer looks the name up in `orms`.
用 `--external_plugins examples/plugins/exact_match_reward.py` 加载（swift rlhf --rlhf_type gkd 或 grpo）：ms-swift 在
构建 trainer 之前于每个进程中导入该文件，trainer 按名字在 `orms` 中查找奖励函数。

The final answer is the content of the last `\\boxed{...}` (math datasets such as AI-MO/NuminaMath-TIR write their
solutions that way), else the whole text; spaces are collapsed before comparing. No extra package is needed (ms-swift's
`accuracy` reward needs `math_verify`, and compares expressions rather than strings).
最终答案取最后一个 `\\boxed{...}` 的内容（AI-MO/NuminaMath-TIR 等数学数据集的解答如此书写），没有时取全文；比较前合并
空白。无需额外依赖（ms-swift 自带的 `accuracy` 奖励需要 `math_verify`，且按数学表达式而非字符串比较）。
"""
from typing import List, Optional

from swift.rewards import ORM, orms

BOXED = '\\boxed{'


def final_answer(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (nested braces allowed) or the whole text, spaces collapsed."""
    start = text.rfind(BOXED)
    if start >= 0:
        depth, begin = 1, start + len(BOXED)
        for end in range(begin, len(text)):
            depth += {'{': 1, '}': -1}.get(text[end], 0)
            if depth == 0:
                text = text[begin:end]
                break
    return ' '.join(text.split())


class ExactMatchReward(ORM):
    """Called as ``reward(completions, **columns)``: one list per dataset column, one entry per completion."""

    def __call__(self, completions: List[str], solution: Optional[List[Optional[str]]] = None,
                 **columns) -> List[Optional[float]]:
        if solution is None:  # no row of the batch has the column: a dataset without it, say so instead of scoring 0
            raise ValueError('exact_match needs a `solution` column in the dataset (the reference answer of each row)')
        # None: the row has no reference, this reward does not apply to it (another reward function must score it)
        return [None if ref is None else float(final_answer(c) == final_answer(ref))
                for c, ref in zip(completions, solution)]


orms['exact_match'] = ExactMatchReward
