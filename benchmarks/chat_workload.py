"""The chat workload the decode and serving benchmarks share: 8 different questions under one
system message, and the random adapters they decode with (rank 16, B drawn N(0, 0.01): B = 0
would be a no-op)."""

SYSTEM = "You are a concise assistant."
QUESTIONS = (
    "Give three tips for keeping a small vegetable garden healthy.",
    "Explain what a hash table is and when to use one.",
    "Write a short poem about the sea at night.",
    "What is the difference between weather and climate?",
    "How do I make a simple tomato sauce for pasta?",
    "Summarize the plot of a classic detective story.",
    "Why is the sky blue during the day and red at sunset?",
    "List four ways to save energy at home.",
)
LORA_R, LORA_B_STD = 16, 0.01
