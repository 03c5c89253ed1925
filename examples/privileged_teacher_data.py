"""Writes a dataset for self-distillation with a privileged teacher: every row of SOURCE (any dataset ms-swift loads,
with answers) plus a `teacher_prompt` column, the last user turn followed by the reference answer, which only the
teacher reads. / 为带特权教师的自蒸馏生成数据：SOURCE 的每一行（ms-swift 能加载、带答案的任意数据集）加上
`teacher_prompt` 列，即最后一个用户轮 + 参考答案，只有教师能看到。

    python privileged_teacher_data.py SOURCE OUT.jsonl
"""
import json
import sys

from swift.dataset import load_dataset


def main(source: str, out: str) -> None:
    rows, _ = load_dataset([source])
    with open(out, 'w', encoding='utf-8') as f:
        for row in rows:
            messages = [m for m in row['messages'] if m['role'] != 'system']
            question, answer = messages[-2]['content'], messages[-1]['content']
            teacher_prompt = f'{question}\n\n参考答案 / Reference answer (use it, do not mention it):\n{answer}'
            f.write(json.dumps({'messages': row['messages'], 'teacher_prompt': teacher_prompt}, ensure_ascii=False)
                    + '\n')


if __name__ == '__main__':
    main(*sys.argv[1:])
