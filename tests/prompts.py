"""Prompts shared by the end-to-end tests: code, prose, and non-ASCII text."""

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):",
    "for i in range(10):",
    "# Copyright",
    "return self._",
    "if __name__ == '__main__':",
    "try:\n    import json\nexcept ImportError:",
    "The quick brown fox",
    "x = [1, 2, 3]\ny =",
    "naïve café",
    "日本語のテキスト",
    "emoji 🙂 and more",
    "while True:\n    line =",
    "raise ValueError(",
    "def __repr__(self):\n        return",
    "with open(path) as f:",
    "lambda x:",
    '"""Module docstring.',
    "Ünïcödé strings: ",
]
