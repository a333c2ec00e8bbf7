"""The demo's replay source: general prompts answered by the base model itself, mixed into the support data.

    python examples/support_agent/make_replay.py [--out examples/support_agent/replay.jsonl] [--max-new-tokens 192]

Every support conversation has the same system prompt and the same reply format, so nothing in the support
data alone tells the model that the format belongs to that system prompt: fine-tuned on it, the model answers
"Write a poem" as a support agent too (the forgetting probe's samples show it). A few general conversations
in the mixture, answered the way the base model answers them, say "without that system prompt, answer as
before". The answers are the base's own (SmolLM2-135M-Instruct from the GGUF fixture, greedy, no system
message, so the template's default system prompt is used as the forgetting probe does): training on them
asks the model to keep its behaviour, not to learn anyone else's. They are not checked for truth: a 135M model
gets facts and sums wrong (`A bicycle has 5 wheels.`), and replay is there to keep what the base does, right
or wrong, where the support data says nothing.

PROMPTS below were written for this project and are none of the forgetting probe's prompts
(src/sftlab/train/probe_prompts.jsonl) nor a near-paraphrase of one (tests/test_support_agent_replay.py
checks this), so the probe still measures drift on prompts the replay never trained on. An answer is kept only
when it ended with the template's end-of-turn token within --max-new-tokens; the others are counted and
printed, never written (a cut-off answer would teach the model to stop mid-sentence). The result is committed
as replay.jsonl, so the demo does not pay the generation. Measured (2026-12-02, 192 new tokens): 96 of the 150
kept — fact 24/26, instruction 20/24, arithmetic 19/20, multilingual 15/20, code 11/20, writing 5/20, advice
2/20: the base model runs past 192 tokens on most open-ended prompts (at 96 tokens: 78 kept, writing 4, advice
1), so the replay leans to short, closed answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GGUF = REPO / ".cache" / "fixtures" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS: dict[str, list[str]] = {
    "fact": [
        "What is the capital city of Canada?",
        "Which planet is known as the Red Planet?",
        "Who discovered penicillin?",
        "What is the tallest mountain in the world?",
        "How many legs does a spider have?",
        "What is the largest desert on Earth?",
        "Which element has the chemical symbol O?",
        "What is the currency of Japan?",
        "Who invented the telephone?",
        "How many bones are in the adult human body?",
        "What is the largest country by area?",
        "Which instrument has 88 keys?",
        "What do caterpillars turn into?",
        "What is the speed of light, roughly?",
        "Which country is home to the kangaroo?",
        "What is the main language spoken in Mexico?",
        "Who was the first president of the United States?",
        "What is the name of our galaxy?",
        "What are the three states of matter?",
        "Which bird is a symbol of peace?",
        "What is the largest organ of the human body?",
        "What is a baby cat called?",
        "Which metal is liquid at room temperature?",
        "How many players are on a football team on the field?",
        "What is the coldest continent?",
        "Which fruit is dried to make raisins?",
    ],
    "instruction": [
        "Name three animals that live in the ocean.",
        "Write the days of the week in order.",
        "Give me three words that rhyme with 'light'.",
        "Convert this sentence to a question: 'She is coming tomorrow.'",
        "Make this sentence shorter: 'Due to the fact that it was raining, we decided to stay inside the house.'",
        "List the vowels of the English alphabet.",
        "Give an example of an adjective.",
        "Name two opposites of the word 'happy'.",
        "Write a sentence that uses the word 'bridge'.",
        "Correct the spelling: 'I recieved the pakage yesterday.'",
        "Give me a synonym for 'quick'.",
        "Write the number 42 in words.",
        "Sort these numbers from smallest to largest: 9, 2, 7, 4.",
        "Name the four seasons of the year.",
        "Explain what a verb is, with one example.",
        "Make a shopping list for baking a cake.",
        "Give three reasons people keep pets.",
        "Change this to the plural: 'The child plays with a toy.'",
        "Write a title for an article about saving water.",
        "What is the opposite of 'ancient'?",
        "Name three things you might find in a kitchen.",
        "Answer with a single number: how many wheels does a bicycle have?",
        "Write the alphabet's first five letters in reverse order.",
        "Split this into two sentences: 'I went to the shop and I bought some milk.'",
    ],
    "writing": [
        "Write a short poem about the moon.",
        "Write a three-sentence story about a dragon who is afraid of the dark.",
        "Write a postcard message from a beach holiday.",
        "Describe a busy market in a few sentences.",
        "Write a short birthday message for a grandmother.",
        "Write two lines of a song about friendship.",
        "Describe the smell of fresh bread.",
        "Write a short advertisement for a bicycle repair shop.",
        "Write a short letter asking a library to extend a book loan.",
        "Describe a snowy mountain in two sentences.",
        "Write a short speech to welcome new students to a school.",
        "Write a riddle about a clock.",
        "Describe a garden in spring.",
        "Write a short review of a pizza restaurant.",
        "Write the first paragraph of a story set on a space station.",
        "Write a tweet announcing the opening of a new park.",
        "Write a short apology for arriving late to a meeting.",
        "Describe a thunderstorm from the point of view of a dog.",
        "Write a short fable with a moral about patience.",
        "Write a cheerful good-night message.",
    ],
    "arithmetic": [
        "What is 36 + 47?",
        "What is 6 times 7?",
        "What is 250 divided by 5?",
        "What is 500 minus 123?",
        "What is 10% of 90?",
        "A book costs 12 dollars. How much do 3 books cost?",
        "What is the square root of 64?",
        "What is 3 to the power of 4?",
        "How many seconds are in 5 minutes?",
        "What is 1.5 + 2.5?",
        "If I walk 4 km every day, how far do I walk in a week?",
        "What is half of 86?",
        "Is 17 an odd or an even number?",
        "What is 11 times 11?",
        "How many hours are in two days?",
        "A pizza is cut into 8 slices and 3 are eaten. How many slices remain?",
        "What is 99 + 1?",
        "What is 20 multiplied by 15?",
        "How many centimetres are in 3 metres?",
        "What is 1/4 written as a decimal?",
    ],
    "code": [
        "Write a Python function that checks whether a string is a palindrome.",
        "Write a Python function that returns the factorial of n.",
        "What does the Python function len() do?",
        "Write a Python loop that prints the numbers from 1 to 10.",
        "How do you make a dictionary in Python?",
        "What is a variable in programming?",
        "Write a JavaScript function that adds two numbers.",
        "What does HTML stand for?",
        "Write a Python function that counts the vowels in a string.",
        "What is the difference between == and = in Python?",
        "Write a SQL query that selects all rows from a table named orders where the total is above 100.",
        "What does the git commit command do?",
        "Write a Python function that returns the smallest number in a list.",
        "What is a function in programming?",
        "How do you add an item to the end of a list in Python?",
        "What does CSS do on a web page?",
        "Write a Python function that converts Celsius to Fahrenheit.",
        "What is an array?",
        "What does the ls command do in a terminal?",
        "Write a Python if statement that prints 'adult' when age is 18 or more.",
    ],
    "advice": [
        "How can I save money on groceries?",
        "What are some ways to reduce stress?",
        "How do I prepare for a job interview?",
        "Give me a tip for keeping houseplants alive.",
        "How can I drink more water during the day?",
        "What is a good morning routine?",
        "How can I be more productive when working from home?",
        "What should I do if I cannot fall asleep?",
        "How do I start running as a beginner?",
        "Give me some tips for making new friends in a new city.",
        "How can I remember names better?",
        "What is a healthy snack I can take to work?",
        "How do I write a good email to my teacher?",
        "Why is it important to wear sunscreen?",
        "How can I reduce the time I spend on my phone?",
        "What are good habits for taking care of my teeth?",
        "How should I plan a small birthday party?",
        "Why do we need to recycle?",
        "Give me an idea for a rainy weekend activity.",
        "How can I learn to cook?",
    ],
    "multilingual": [
        "¿Cuál es el océano más grande del mundo?",
        "Quelle est la capitale de l'Italie ?",
        "Wie heißt die Hauptstadt von Österreich?",
        "Qual é a capital de Portugal?",
        "¿Cuántos meses tiene un año?",
        "Comment dit-on 'thank you' en français ?",
        "Was ist die Farbe von Schnee?",
        "Translate into German: 'Where is the train station?'",
        "What does the Spanish word 'gracias' mean?",
        "Translate into French: 'I like to read books.'",
        "What does the Italian word 'ciao' mean?",
        "Écris une phrase courte sur le printemps.",
        "Escribe una frase corta sobre el sol.",
        "Translate into Spanish: 'Good night and sleep well.'",
        "Wie viel ist zwei plus drei?",
        "What does 'bonjour' mean in English?",
        "¿De qué color es una naranja?",
        "Nenne drei Farben.",
        "Quel animal dit « miaou » ?",
        "Translate into Italian: 'Thank you very much.'",
    ],
}
"""Written for this project: 150 general prompts in the forgetting probe's seven kinds (other questions), none of
them the probe's."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "replay.jsonl"), help="where the replay source goes")
    parser.add_argument("--model", default=str(GGUF), help="the base model: .gguf, HF dir or hub id")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="an answer longer than this is dropped")
    parser.add_argument("--batch", type=int, default=16, help="prompts decoded together")
    args = parser.parse_args(argv)

    rows = [{"kind": kind, "messages": [{"role": "user", "content": text}]}
            for kind, texts in PROMPTS.items() for text in texts]
    answers = base_answers(args.model, [row["messages"] for row in rows], args.max_new_tokens, args.batch)
    kept, dropped = [], []
    for row, (text, ended) in zip(rows, answers):
        (kept if ended and text else dropped).append({**row, "messages": [*row["messages"],
                                                                           {"role": "assistant", "content": text}]})
    with Path(args.out).open("w", encoding="utf-8") as file:
        for row in kept:
            file.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n")
    by_kind = ", ".join(f"{kind} {sum(r['kind'] == kind for r in kept)}" for kind in PROMPTS)
    print(f"{len(kept)} of {len(rows)} answers kept -> {args.out} ({by_kind})")
    if dropped:
        print(f"{len(dropped)} dropped: no end-of-turn within {args.max_new_tokens} new tokens (or empty):")
        for row in dropped:
            print(f"  [{row['kind']}] {row['messages'][0]['content']}")
    return 0


def base_answers(model: str, conversations: list[list[dict]], max_new_tokens: int,
                 batch: int) -> list[tuple[str, bool]]:
    """Greedy answers of the base model, each with whether it ended with an end-of-turn token."""
    import torch

    from sftlab.generate import prompt_ids, stop_token_ids
    from sftlab.runs import load_for_inference

    if model.endswith(".gguf"):
        from sftlab.models.gguf import model_dir_for

        model = model_dir_for(model)
    net, tokenizer, template, _ = load_for_inference(model)
    stops = stop_token_ids(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts = [prompt_ids(tokenizer, template, messages) for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[tuple[str, bool]] = [("", False)] * len(prompts)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
        with torch.inference_mode():
            out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=stops, pad_token_id=pad)
        for i, row in zip(chunk, out[:, width:].tolist()):
            end = next((n for n, t in enumerate(row) if t in stops), None)
            text = tokenizer.decode(row[:end] if end is not None else row, skip_special_tokens=True).strip()
            results[i] = (text, end is not None)
        print(f"  {min(start + batch, len(order))}/{len(order)} answered", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
