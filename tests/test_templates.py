import random

import pytest

from magicseg_engine.prompts.counterfactual import find_mentions, missing_classes
from magicseg_engine.prompts.sampling import sample_class_combos
from magicseg_engine.prompts.templates import describe_from_templates
from magicseg_engine.vocab import load_vocabulary


@pytest.mark.slow
def test_every_description_mentions_each_class_exactly_once_across_vocabularies():
    for name in ("voc", "context", "coco-object", "coco-stuff"):
        vocab = load_vocabulary(name)
        for i, combo in enumerate(sample_class_combos(vocab.classes, 400, 2, seed=1)):
            text = describe_from_templates(combo, random.Random(i))
            assert missing_classes(text, combo) == [], text
            for c in combo:
                # A scene fragment never names the sample's class a second time.
                others = [o for o in combo if o != c]
                spans = [s for s in find_mentions(text, c)
                         if not any(s[0] >= o[0] and s[1] <= o[1] for oc in others for o in find_mentions(text, oc))]
                assert len(spans) == 1, (c, text)


def test_same_generator_state_gives_the_same_text_and_the_bank_is_varied():
    combo = ("dog", "cat")
    assert describe_from_templates(combo, random.Random(7)) == describe_from_templates(combo, random.Random(7))
    texts = {describe_from_templates(combo, random.Random(i)) for i in range(300)}
    assert len(texts) > 250


def test_articles_and_mass_nouns():
    texts = [describe_from_templates(("umbrella",), random.Random(i)) for i in range(50)]
    assert any(" an umbrella " in t for t in texts)
    assert not any(" a umbrella" in t for t in texts)
    grass = [describe_from_templates(("grass",), random.Random(i)) for i in range(50)]
    assert not any(" a grass" in t for t in grass)
