"""Writes counterfactual_corpus.jsonl: prompts, the classes to remove, and the expected negative.

The expected negatives come from the templates and the hand-written cases below, never from the
rewriter under test; `expected: null` means the prompt must be refused (it does not mention a
class as an object). Run it from anywhere: python tests/data/make_counterfactual_corpus.py
"""

import json
from pathlib import Path

# Class -> (with its indefinite article, plural), written out by hand.
NOUNS = {
    "person": ("a person", "people"), "bicycle": ("a bicycle", "bicycles"), "car": ("a car", "cars"),
    "motorcycle": ("a motorcycle", "motorcycles"), "airplane": ("an airplane", "airplanes"),
    "bus": ("a bus", "buses"), "train": ("a train", "trains"), "truck": ("a truck", "trucks"),
    "boat": ("a boat", "boats"), "traffic light": ("a traffic light", "traffic lights"),
    "fire hydrant": ("a fire hydrant", "fire hydrants"), "stop sign": ("a stop sign", "stop signs"),
    "parking meter": ("a parking meter", "parking meters"), "bench": ("a bench", "benches"),
    "bird": ("a bird", "birds"), "cat": ("a cat", "cats"), "dog": ("a dog", "dogs"),
    "horse": ("a horse", "horses"), "sheep": ("a sheep", "sheep"), "cow": ("a cow", "cows"),
    "elephant": ("an elephant", "elephants"), "bear": ("a bear", "bears"), "zebra": ("a zebra", "zebras"),
    "giraffe": ("a giraffe", "giraffes"), "backpack": ("a backpack", "backpacks"),
    "umbrella": ("an umbrella", "umbrellas"), "handbag": ("a handbag", "handbags"), "tie": ("a tie", "ties"),
    "suitcase": ("a suitcase", "suitcases"), "frisbee": ("a frisbee", "frisbees"),
    "snowboard": ("a snowboard", "snowboards"), "kite": ("a kite", "kites"),
    "baseball bat": ("a baseball bat", "baseball bats"), "baseball glove": ("a baseball glove", "baseball gloves"),
    "skateboard": ("a skateboard", "skateboards"), "surfboard": ("a surfboard", "surfboards"),
    "tennis racket": ("a tennis racket", "tennis rackets"), "bottle": ("a bottle", "bottles"),
    "wine glass": ("a wine glass", "wine glasses"), "cup": ("a cup", "cups"), "fork": ("a fork", "forks"),
    "knife": ("a knife", "knives"), "spoon": ("a spoon", "spoons"), "bowl": ("a bowl", "bowls"),
    "banana": ("a banana", "bananas"), "apple": ("an apple", "apples"), "sandwich": ("a sandwich", "sandwiches"),
    "orange": ("an orange", "oranges"), "carrot": ("a carrot", "carrots"), "hot dog": ("a hot dog", "hot dogs"),
    "pizza": ("a pizza", "pizzas"), "donut": ("a donut", "donuts"), "cake": ("a cake", "cakes"),
    "chair": ("a chair", "chairs"), "couch": ("a couch", "couches"), "potted plant": ("a potted plant", "potted plants"),
    "bed": ("a bed", "beds"), "dining table": ("a dining table", "dining tables"), "toilet": ("a toilet", "toilets"),
    "tv": ("a tv", "tvs"), "laptop": ("a laptop", "laptops"), "mouse": ("a mouse", "mice"),
    "remote": ("a remote", "remotes"), "keyboard": ("a keyboard", "keyboards"), "cell phone": ("a cell phone", "cell phones"),
    "microwave": ("a microwave", "microwaves"), "oven": ("an oven", "ovens"), "toaster": ("a toaster", "toasters"),
    "sink": ("a sink", "sinks"), "refrigerator": ("a refrigerator", "refrigerators"), "book": ("a book", "books"),
    "clock": ("a clock", "clocks"), "vase": ("a vase", "vases"), "scissors": ("a pair of scissors", "scissors"),
    "teddy bear": ("a teddy bear", "teddy bears"), "hair drier": ("a hair drier", "hair driers"),
    "toothbrush": ("a toothbrush", "toothbrushes"),
}

# Pairs of COCO classes that share scenes (a rider and a bicycle, a fork and a knife).
PAIRS = [
    ("person", "bicycle"), ("person", "skateboard"), ("person", "surfboard"), ("person", "snowboard"),
    ("person", "tennis racket"), ("person", "baseball bat"), ("person", "frisbee"), ("person", "kite"),
    ("person", "umbrella"), ("person", "horse"), ("person", "motorcycle"), ("person", "laptop"),
    ("person", "cell phone"), ("person", "handbag"), ("person", "backpack"), ("person", "tie"),
    ("person", "suitcase"), ("person", "baseball glove"), ("dog", "frisbee"), ("dog", "couch"),
    ("cat", "laptop"), ("cat", "bed"), ("cat", "keyboard"), ("car", "traffic light"), ("car", "truck"),
    ("bus", "car"), ("truck", "fire hydrant"), ("car", "stop sign"), ("car", "parking meter"),
    ("bench", "bird"), ("boat", "bird"), ("train", "traffic light"), ("zebra", "giraffe"),
    ("elephant", "bird"), ("cow", "sheep"), ("horse", "cow"), ("pizza", "dining table"),
    ("cup", "dining table"), ("fork", "knife"), ("spoon", "bowl"), ("sandwich", "cup"), ("donut", "cup"),
    ("cake", "knife"), ("banana", "apple"), ("orange", "banana"), ("carrot", "knife"), ("hot dog", "bottle"),
    ("wine glass", "bottle"), ("toilet", "sink"), ("oven", "microwave"), ("refrigerator", "oven"),
    ("tv", "couch"), ("remote", "tv"), ("book", "vase"), ("clock", "vase"), ("teddy bear", "bed"),
    ("toothbrush", "sink"), ("scissors", "book"), ("potted plant", "chair"), ("chair", "dining table"),
    ("airplane", "truck"), ("mouse", "keyboard"), ("toaster", "microwave"), ("hair drier", "toilet"),
    ("bear", "giraffe"),
]

COUNTS = ("two", "three", "several", "some")


def pair_rows():
    rows = []
    for i, (a, b) in enumerate(PAIRS):
        (aa, ap), (ba, _) = NOUNS[a], NOUNS[b]
        count = COUNTS[i % len(COUNTS)]
        a_plural = ap if a != "scissors" else "pairs of scissors"
        capital = aa[0].upper() + aa[1:]
        variant = i % 3
        if variant == 0:
            prompt = f"{aa} next to {ba} on a sunny day"
            rows += [(prompt, [a], f"nothing next to {ba} on a sunny day"),
                     (prompt, [b], f"{aa} next to nothing on a sunny day")]
        elif variant == 1:
            prompt = f"A photo of {aa} and {ba}, seen from above."
            rows += [(prompt, [a, b], "A photo of nothing and nothing, seen from above."),
                     (f"{count} {a_plural} near {ba} at dusk", [a], f"nothing near {ba} at dusk")]
        else:
            rows += [(f"{capital} with {ba}. {capital}.", [a], f"Nothing with {ba}. Nothing."),
                     (f"{capital} with {ba}. {capital}.", [b], f"{capital} with nothing. {capital}.")]
    return rows


# Class words inside longer names: the longer name is its own label and is kept.
LONGER_NAMES = [
    ("a hot dog next to a dog", ["dog"], "a hot dog next to nothing"),
    ("a hot dog next to a dog", ["hot dog"], "nothing next to a dog"),
    ("a hot dog next to a dog", ["dog", "hot dog"], "nothing next to nothing"),
    ("two hot dogs and two dogs", ["dog"], "two hot dogs and nothing"),
    ("A hot-dog stand and a dog", ["dog"], "A hot-dog stand and nothing"),
    ("a dog eating a hot dog", ["hot dog"], "a dog eating nothing"),
    ("a teddy bear and a bear", ["bear"], "a teddy bear and nothing"),
    ("a teddy bear and a bear", ["teddy bear"], "nothing and a bear"),
    ("teddy bears on a bed", ["bed"], "teddy bears on nothing"),
    ("a Teddy-Bear next to a real bear", ["bear"], "a Teddy-Bear next to a real nothing"),
    ("a traffic light above a light", ["light"], "a traffic light above nothing"),
    ("a traffic light and a light", ["traffic light", "light"], "nothing and nothing"),
    ("a dining table and a table", ["table"], "a dining table and nothing"),
    ("a dining table and a table", ["dining table"], "nothing and a table"),
    ("a potted plant beside a plant", ["plant"], "a potted plant beside nothing"),
    ("potted plants and plants", ["potted plant"], "nothing and plants"),
    ("a brick wall and a wall", ["wall"], "a brick wall and nothing"),
    ("a stone wall on stone", ["stone"], "a stone wall on nothing"),
    ("water drops on a window", ["window"], "water drops on nothing"),
    ("a window blind and a window", ["window"], "a window blind and nothing"),
    ("a ceiling tile on the ceiling", ["ceiling"], "a ceiling tile on nothing"),
    ("a wood floor and wood", ["wood"], "a wood floor and nothing"),
    ("a tile floor next to a floor", ["floor"], "a tile floor next to nothing"),
    ("a stop sign and a sign", ["sign"], "a stop sign and nothing"),
    ("a tv monitor next to a tv", ["tv"], "a tv monitor next to nothing"),
    ("a corn dog and a dog", ["dog"], "a corn dog and nothing"),
    ("a prairie dog and a dog", ["dog"], "a prairie dog and nothing"),
    ("a sea cow near a cow", ["cow"], "a sea cow near nothing"),
    ("a rocking horse and a horse", ["horse"], "a rocking horse and nothing"),
    ("a cable car above a car", ["car"], "a cable car above nothing"),
    ("a doghouse and a dog", ["dog"], "a doghouse and nothing"),
    ("a catwalk and a cat", ["cat"], "a catwalk and nothing"),
]

# Class words modifying a following noun: no mention; the negative drops the modifier.
MODIFIERS = [
    ("a bus at the bus stop", ["bus"], "nothing at the stop"),
    ("two bus stops and a bus", ["bus"], "two stops and nothing"),
    ("a bus stops at the corner", ["bus"], "nothing stops at the corner"),
    ("A dog bowl next to a sleeping dog", ["dog"], "A bowl next to a sleeping nothing"),
    ("a dog bowl and a dog", ["dog"], "a bowl and nothing"),
    ("a car in a car park", ["car"], "nothing in a park"),
    ("several cars in a car park", ["car"], "nothing in a park"),
    ("a cat next to a bag of cat food", ["cat"], "nothing next to a bag of food"),
    ("Cat food on the floor. A cat.", ["cat"], "Food on the floor. Nothing."),
    ("a dog sleeping in a dog bed", ["dog"], "nothing sleeping in a bed"),
    ("a dog sleeping in a dog bed", ["dog", "bed"], "nothing sleeping in nothing"),
    ("a dog bed in a living room", ["bed"], "nothing in a living room"),
    ("a bird in a bird cage", ["bird"], "nothing in a cage"),
    ("a horse in a horse stable", ["horse"], "nothing in a stable"),
    ("a train at the train station", ["train"], "nothing at the station"),
    ("a tv on a tv stand", ["tv"], "nothing on a stand"),
    ("a person holding a tv remote", ["remote"], "a person holding nothing"),
    ("a cake on a cake stand", ["cake"], "nothing on a stand"),
    ("a pizza box and a pizza", ["pizza"], "a box and nothing"),
    ("a bottle of orange juice and an orange", ["orange"], "a bottle of juice and nothing"),
    ("an orange cat next to an orange", ["orange"], "a cat next to nothing"),
    ("an apple pie and an apple", ["apple"], "a pie and nothing"),
    ("a banana peel and a banana", ["banana"], "a peel and nothing"),
    ("a dog leash and a dog", ["dog"], "a leash and nothing"),
    ("a cat toy and a cat", ["cat"], "a toy and nothing"),
    ("a horse rider on a horse", ["horse"], "a rider on nothing"),
    ("a bus driver in a bus", ["bus"], "a driver in nothing"),
    ("a car seat in a car", ["car"], "a seat in nothing"),
    ("a bicycle rack with a bicycle", ["bicycle"], "a rack with nothing"),
    ("bicycle wheels and a bicycle", ["bicycle"], "wheels and nothing"),
    ("a boat dock with a boat", ["boat"], "a dock with nothing"),
    ("a water bottle next to a cup", ["cup"], "a water bottle next to nothing"),
    ("a water bottle next to a cup", ["bottle"], "nothing next to a cup"),
    ("a wood table and a chair", ["table"], "nothing and a chair"),
    ("a stone bridge over water", ["water"], "a stone bridge over nothing"),
    ("a stone bridge over water", ["bridge", "water"], "nothing over nothing"),
    ("a dog-friendly park with a dog", ["dog"], "a park with nothing"),
    ("a horse-drawn carriage and a horse", ["horse"], "a carriage and nothing"),
    ("an elephant-shaped cloud above an elephant", ["elephant"], "a cloud above nothing"),
    ("a snow-covered car in the snow", ["snow"], "a car in nothing"),
    ("a snow-covered car in the snow", ["car"], "a snow-covered nothing in the snow"),
    ("a sheep dog herding sheep", ["sheep"], "a dog herding nothing"),
    ("a sheep dog herding sheep", ["dog"], "nothing herding sheep"),
    ("a sheep-dog and a sheep", ["sheep"], "a dog and nothing"),
    ("a lap-dog on a couch", ["dog"], "nothing on a couch"),
    ("a person plants a tree", ["person"], "nothing plants a tree"),
    ("a dog-bed and a dog", ["dog"], "a bed and nothing"),
    ("(dog bowl) near a dog", ["dog"], "(bowl) near nothing"),
]

# Possessives: not a mention; the possessor and its "'s" go, its determiner stays.
POSSESSIVES = [
    ("a dog's bowl next to a dog", ["dog"], "a bowl next to nothing"),
    ("a dog\u2019s bowl next to a dog", ["dog"], "a bowl next to nothing"),
    ("the cat's toy and the cat", ["cat"], "the toy and nothing"),
    ("my dog's frisbee and my dog", ["dog"], "my frisbee and nothing"),
    ("a dog's apple and a dog", ["dog"], "an apple and nothing"),
    ("an elephant's trunk next to an elephant", ["elephant"], "a trunk next to nothing"),
    ("the dogs' bowls and two dogs", ["dog"], "the bowls and nothing"),
    ("people's umbrellas and a person", ["person"], "umbrellas and nothing"),
    ("a person's umbrella and a person", ["person", "umbrella"], "nothing and nothing"),
    ("A cat's bed. A cat.", ["cat"], "A bed. Nothing."),
    ("Cat's toy next to a cat", ["cat"], "Toy next to nothing"),
    ("a bird's-eye view of a bird", ["bird"], "a view of nothing"),
    ("the giraffe's neck and a giraffe", ["giraffe"], "the neck and nothing"),
    ("a horse's saddle and a horse", ["horse"], "a saddle and nothing"),
    ("the bus's door near a bus", ["bus"], "the door near nothing"),
    ("the sheep's wool and a sheep", ["sheep"], "the wool and nothing"),
    ("a big dog's bowl and a dog", ["dog"], "a big bowl and nothing"),
    ("a dog's bowl next to a dog", ["bowl"], "a dog's nothing next to a dog"),
    ("the bowl is the dog's, and the dog sleeps", ["dog"], "the bowl is, and nothing sleeps"),
    ("a person's cell phone on a bench", ["cell phone"], "a person's nothing on a bench"),
]

# Capitals at sentence starts and repeated sentences.
CAPITALS = [
    ("A sheep. A sheep.", ["sheep"], "Nothing. Nothing."),
    ("a sheep. a sheep.", ["sheep"], "nothing. nothing."),
    ("A dog! A dog? A dog.", ["dog"], "Nothing! Nothing? Nothing."),
    ("Dogs run. Two dogs sleep.", ["dog"], "Nothing run. Nothing sleep."),
    ("The cat sat. Then the cat left.", ["cat"], "Nothing sat. Then nothing left."),
    ("\"A dog,\" she said.", ["dog"], "\"Nothing,\" she said."),
    ("A photo of a Dog.", ["dog"], "A photo of nothing."),
    ("DOGS on a beach", ["dog"], "Nothing on a beach"),
    ("A cat and a dog. The dog barks.", ["dog"], "A cat and nothing. Nothing barks."),
    ("a cat. A cat and a dog.", ["cat", "dog"], "nothing. Nothing and nothing."),
    ("Two people. Three people. A person.", ["person"], "Nothing. Nothing. Nothing."),
    ("(A dog) on the grass", ["dog"], "(Nothing) on the grass"),
    ("Dog bowls on the floor next to a dog.", ["dog"], "Bowls on the floor next to nothing."),
    ("An orange. An orange cat.", ["orange"], "Nothing. A cat."),
    ("A zebra grazes.\nA zebra drinks.", ["zebra"], "Nothing grazes. Nothing drinks."),
    ("The Traffic-Lights of a city", ["traffic light"], "Nothing of a city"),
    ("A Fire Hydrant. Another fire hydrant.", ["fire hydrant"], "Nothing. Nothing."),
    ("My cat sleeps. My cat eats.", ["cat"], "Nothing sleeps. Nothing eats."),
]

# Determiners in front of the removed noun go with it; adjectives stay.
DETERMINERS = [
    ("a dog on a beach", ["dog"], "nothing on a beach"),
    ("an elephant on a beach", ["elephant"], "nothing on a beach"),
    ("the dog on a beach", ["dog"], "nothing on a beach"),
    ("two dogs on a beach", ["dog"], "nothing on a beach"),
    ("some dogs on a beach", ["dog"], "nothing on a beach"),
    ("several dogs on a beach", ["dog"], "nothing on a beach"),
    ("3 dogs on a beach", ["dog"], "nothing on a beach"),
    ("12 dogs on a beach", ["dog"], "nothing on a beach"),
    ("a group of dogs on a beach", ["dog"], "nothing on a beach"),
    ("a pack of dogs on a beach", ["dog"], "nothing on a beach"),
    ("my dog on a beach", ["dog"], "nothing on a beach"),
    ("this dog on a beach", ["dog"], "nothing on a beach"),
    ("these dogs on a beach", ["dog"], "nothing on a beach"),
    ("those cats in a garden", ["cat"], "nothing in a garden"),
    ("a few cats in a garden", ["cat"], "nothing in a garden"),
    ("many birds in the sky", ["bird"], "nothing in the sky"),
    ("a flock of birds in the sky", ["bird"], "nothing in the sky"),
    ("a herd of cows in a field", ["cow"], "nothing in a field"),
    ("a couple of horses in a field", ["horse"], "nothing in a field"),
    ("lots of people in a square", ["person"], "nothing in a square"),
    ("a lot of people in a square", ["person"], "nothing in a square"),
    ("all the cars in a street", ["car"], "nothing in a street"),
    ("both cats on a sofa", ["cat"], "nothing on a sofa"),
    ("another cat on a sofa", ["cat"], "nothing on a sofa"),
    ("every chair in the room", ["chair"], "nothing in the room"),
    ("a girl walking her dog", ["dog"], "a girl walking nothing"),
    ("kids riding their bicycles", ["bicycle"], "kids riding nothing"),
    ("a pile of books on a desk", ["book"], "nothing on a desk"),
    ("a stack of books on a desk", ["book"], "nothing on a desk"),
    ("a big dog on a beach", ["dog"], "a big nothing on a beach"),
    ("two small dogs on a beach", ["dog"], "two small nothing on a beach"),
    ("an old mouse and three mice", ["mouse"], "an old nothing and nothing"),
    ("a group of sheep in a field", ["sheep"], "nothing in a field"),
]

# Plural and irregular forms, and names that are plural already.
PLURALS = [
    ("people crossing a street", ["person"], "nothing crossing a street"),
    ("a person and two people", ["person"], "nothing and nothing"),
    ("mice on a desk", ["mouse"], "nothing on a desk"),
    ("knives and a knife on a board", ["knife"], "nothing and nothing on a board"),
    ("sheep grazing on a hill", ["sheep"], "nothing grazing on a hill"),
    ("a ski in the snow", ["skis"], "nothing in the snow"),
    ("skis in the snow", ["skis"], "nothing in the snow"),
    ("a leaf on the water", ["leaves"], "nothing on the water"),
    ("leaves on the ground", ["leaves"], "nothing on the ground"),
    ("buses near a bus", ["bus"], "nothing near nothing"),
    ("benches in a park", ["bench"], "nothing in a park"),
    ("wine glasses on a table", ["wine glass"], "nothing on a table"),
    ("teddy bears on a shelf", ["teddy bear"], "nothing on a shelf"),
    ("potted plants on a balcony", ["potted plant"], "nothing on a balcony"),
    ("tv monitors in an office", ["tv monitor"], "nothing in an office"),
    ("hair driers in a salon", ["hair drier"], "nothing in a salon"),
    ("cell phones on a desk", ["cell phone"], "nothing on a desk"),
    ("a cloud and clouds in the sky", ["clouds"], "nothing and nothing in the sky"),
    ("a pair of scissors on paper", ["scissors"], "nothing on paper"),
    ("dozens of mice in a barn", ["mouse"], "nothing in a barn"),
    ("people near a bus, buses everywhere", ["bus", "person"], "nothing near nothing, nothing everywhere"),
]

# Multi-word names, hyphenated or not.
MULTIWORD = [
    ("a fire hydrant on a sidewalk", ["fire hydrant"], "nothing on a sidewalk"),
    ("a Fire-Hydrant on a sidewalk", ["fire hydrant"], "nothing on a sidewalk"),
    ("fire-hydrants on a sidewalk", ["fire hydrant"], "nothing on a sidewalk"),
    ("traffic-lights at a crossing", ["traffic light"], "nothing at a crossing"),
    ("a traffic  light at a crossing", ["traffic light"], "nothing at a crossing"),
    ("two people next to a traffic light at night", ["person", "traffic light"], "nothing next to nothing at night"),
    ("a tennis racket and a baseball bat", ["tennis racket", "baseball bat"], "nothing and nothing"),
    ("a cell-phone on a table", ["cell phone"], "nothing on a table"),
    ("a hair drier in a bathroom", ["hair drier"], "nothing in a bathroom"),
    ("a hot-dog on a plate", ["hot dog"], "nothing on a plate"),
    ("a stop-sign at a corner", ["stop sign"], "nothing at a corner"),
    ("a parking meter on a street", ["parking meter"], "nothing on a street"),
    ("a baseball glove and a sports ball", ["baseball glove", "sports ball"], "nothing and nothing"),
    ("a potted plant, a sofa, and a cat", ["potted plant", "cat"], "nothing, a sofa, and nothing"),
    ("a dining table with a wine glass", ["dining table", "wine glass"], "nothing with nothing"),
    ("a teddy bear on a bed", ["teddy bear"], "nothing on a bed"),
    ("a brick wall behind a fire hydrant", ["brick wall", "fire hydrant"], "nothing behind nothing"),
    ("a person on the grass under the sky", ["person", "grass", "sky"], "nothing on nothing under nothing"),
    ("a surfboard on the sea", ["surfboard", "sea"], "nothing on nothing"),
    ("a tree by the road", ["tree", "road"], "nothing by nothing"),
]

# Prompts that name a class only in another role: refused, never turned into a pair.
REFUSED = [
    ("a bus stop at dusk", ["bus"]),
    ("a dog's bowl on the floor", ["dog"]),
    ("a hot dog on a plate", ["dog"]),
    ("an orange cat on a sofa", ["orange"]),
    ("a dining table in a room", ["table"]),
    ("a teddy bear on a bed", ["bear"]),
    ("the bowl is the dog's.", ["dog"]),
    ("a doghouse in a yard", ["dog"]),
    ("water drops on a window", ["water"]),
    ("a person holding a tv remote", ["tv"]),
]


def main() -> None:
    rows = pair_rows() + LONGER_NAMES + MODIFIERS + POSSESSIVES + CAPITALS + DETERMINERS + PLURALS + MULTIWORD
    out = Path(__file__).with_name("counterfactual_corpus.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for prompt, remove, expected in rows:
            f.write(json.dumps({"prompt": prompt, "remove": remove, "expected": expected}, ensure_ascii=False) + "\n")
        for prompt, remove in REFUSED:
            f.write(json.dumps({"prompt": prompt, "remove": remove, "expected": None}, ensure_ascii=False) + "\n")
    print(f"{len(rows) + len(REFUSED)} rows -> {out}")


if __name__ == "__main__":
    main()
