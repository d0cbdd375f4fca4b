"""Writes the quickstart's data: a small, deterministic "extract as JSON" task.

Each example is a sentence about a person; the answer is exactly
`{"name": "...", "age": N, "city": "..."}` — a fixed output format the base SmolLM2 does not
produce by itself (it adds prose or code fences), so `json_match` on held-out sentences shows what
fine-tuning changed. Held-out examples use names and cities that never occur in training.

    python examples/data/make_dataset.py        # rewrites train.jsonl and eval.jsonl next to it
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Extract the person's name, age and city as JSON."

NAMES = [
    "Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Lucas",
    "Sofia", "Noah", "Amara", "Ivan", "Chloe", "Mateo", "Hana", "David", "Zara", "Felix",
    "Elena", "Samuel", "Mei", "Oscar", "Nadia", "Leo", "Ingrid", "Ravi", "Julia", "Kofi",
    "Anna", "Diego", "Yuki", "Hugo", "Layla", "Erik", "Rosa", "Arjun", "Clara", "Tariq",
    "Emma", "Liam", "Olivia", "Ethan", "Ava", "Mason", "Isla", "Jonas", "Mila", "Pablo",
    "Sara", "Hassan", "Keiko", "Marco", "Ana", "Viktor", "Lucia", "Ahmed", "Greta", "Tomas",
    "Nina", "Rafael", "Aisha", "Henrik", "Elif", "Kenji", "Beatriz", "Dmitri", "Leila", "Pierre",
    "Chen", "Sven", "Amina", "Luca", "Freya", "Mohamed", "Iris", "Andrei", "Nora", "Jamal",
]
CITIES = [
    "Lisbon", "Boston", "Osaka", "Cairo", "Berlin", "Lima", "Mumbai", "Leeds", "Dakar", "Lyon",
    "Madrid", "Denver", "Kyoto", "Tunis", "Vienna", "Quito", "Pune", "Dublin", "Accra", "Porto",
    "Oslo", "Austin", "Seoul", "Rabat", "Prague", "Bogota", "Delhi", "Cardiff", "Nairobi", "Nice",
    "Paris", "Rome", "Tokyo", "Sydney", "Toronto", "Chicago", "Hamburg", "Milan", "Warsaw", "Athens",
    "Zurich", "Geneva", "Munich", "Naples", "Seville", "Valencia", "Bristol", "Glasgow", "Helsinki", "Riga",
    "Krakow", "Budapest", "Sofia", "Istanbul", "Beirut", "Dubai", "Doha", "Karachi", "Dhaka", "Hanoi",
    "Manila", "Jakarta", "Perth", "Auckland", "Santiago", "Havana", "Montreal", "Seattle", "Phoenix", "Miami",
    "Atlanta", "Houston", "Dallas", "Portland", "Calgary", "Tallinn", "Vilnius", "Bergen", "Malmo", "Gdansk",
]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last year.",
    "Born {age} years ago, {name} now calls {city} home.",
    "In {city}, {name} just turned {age}.",
    "{name}, aged {age}, works in {city}.",
    "After years abroad, {name} settled in {city} at the age of {age}.",
    "The new librarian in {city} is {name}, who is {age}.",
]

TRAIN_SIZE, EVAL_SIZE = 240, 40
HELD_OUT_NAMES, HELD_OUT_CITIES = 10, 10  # the last ones of each list appear only in eval


def example(rng: random.Random, names: list[str], cities: list[str]) -> tuple[str, str]:
    person = {"name": rng.choice(names), "age": rng.randint(18, 89), "city": rng.choice(cities)}
    sentence = rng.choice(TEMPLATES).format(**person)
    return sentence, json.dumps(person)


def main() -> None:
    folder = Path(__file__).resolve().parent
    rng = random.Random(1234)
    train_names, eval_names = NAMES[:-HELD_OUT_NAMES], NAMES[-HELD_OUT_NAMES:]
    train_cities, eval_cities = CITIES[:-HELD_OUT_CITIES], CITIES[-HELD_OUT_CITIES:]
    with open(folder / "train.jsonl", "w") as out:
        for _ in range(TRAIN_SIZE):
            sentence, answer = example(rng, train_names, train_cities)
            out.write(json.dumps({"instruction": INSTRUCTION, "input": sentence, "response": answer}) + "\n")
    with open(folder / "eval.jsonl", "w") as out:
        for _ in range(EVAL_SIZE):
            sentence, answer = example(rng, eval_names, eval_cities)
            # The prompt is what the instruction format gives the model: instruction, blank line, input.
            out.write(json.dumps({"prompt": f"{INSTRUCTION}\n\n{sentence}", "reference": answer}) + "\n")


if __name__ == "__main__":
    main()
