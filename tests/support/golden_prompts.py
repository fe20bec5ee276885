"""The prompts and greedy length every golden script (family_golden.py,
hf_golden.py) records: mixed scripts, digits, whitespace runs, emoji and
control tokens."""

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "<|im_start|>user\nNaïve café, 東京 and 42 × 7 = 294 😀!<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé   spaces\t\ttabs\n\n\nnumbers 1234567 and 3.14159, Привет мир, مرحبا 🤖🚀",
]
GREEDY = 16
