"""The embedded word list of press_synth and a tiny sentence grammar.

Sentences follow "determiner [adjective] noun verb determiner [adjective] noun
[preposition determiner noun] [adverb]", which gives eSpeak NG natural phrase
intonation while staying a plain word list.
"""

import numpy as np

DETERMINERS = ('the', 'a', 'one', 'this', 'that', 'every', 'my', 'our',
               'their', 'your', 'his', 'her', 'some', 'another')

NOUNS = tuple("""
apple army baby bag ball band bank basket bath beach bean bear bed bell bicycle
bird blanket boat body bone book bottle box boy bread bridge brother brush
bucket building bus butter button cake camera camp candle cap captain car card
carpet cart castle cat chain chair chalk cheese chicken child church circle
city clock cloud coat coffee coin collar corner cottage country cousin cow crowd
cup curtain daughter desk dinner doctor dog doll door dragon drawer dream dress
driver drum duck eagle earth egg elephant engine evening eye face factory
farmer father feather fence field finger fire fish flag floor flower forest
fork fox friend frog garden gate giant girl glass glove goat gold grass guitar
hammer hand harbour hat heart helmet hill horse hospital hotel house island
jacket jar jelly jungle kettle key king kitchen kite knife ladder lady lake
lamp leaf lemon letter library lion lizard map market meadow merchant milk mill
mirror monkey moon morning mother mountain mouse museum nail needle nest net
newspaper night nurse ocean office onion orange owl painter palace pancake
paper parcel parrot path pear pencil pepper piano picture pig pillow pilot
pirate plane planet plate pocket poet pond potato prince princess pumpkin
puppy queen rabbit radio rain ribbon river road robot rock roof room rope rose
sailor salad sand school scissors sea seed shadow sheep shell ship shirt shoe
shop singer sister sky snake snow soldier song soup spoon spring square star
station stone storm story stranger street student sugar summer sun supper
sweater table tailor teacher teapot telephone tent thief ticket tiger
toast tomato tower town toy tractor train tree truck tunnel turtle umbrella
uncle valley van vase village violin wagon wall wallet watch water wave
whale wheel window winter wizard wolf woman worker yard
""".split())

ADJECTIVES = tuple("""
ancient angry bright brave broken busy calm careful cheerful clean clever cold
colourful cosy curious dark deep distant dusty eager early empty enormous
famous fancy fast fierce flat fresh friendly frozen funny gentle giant golden
good graceful green grey happy heavy hidden high hollow honest huge humble
hungry icy important jolly kind large late lazy light little lively lonely
long loud lovely lucky magic modern narrow neat nervous new noisy old orange
pale patient perfect plain polite poor precious pretty proud purple quick
quiet rapid rare red rich rough round royal rusty sad safe salty sandy secret
sharp shiny short silent silver simple sleepy slow small smooth soft solid
sour spotted square steady sticky strange strong sunny sweet swift tall tender
thick thin tidy tiny tired warm wet white wide wild windy wise wooden yellow
young
""".split())

VERBS = tuple("""
admired answered baked borrowed bought brought built burned buried called
carried caught chased cleaned climbed collected cooked copied counted covered
crossed cut delivered discovered dragged drew dropped emptied enjoyed explored
fed fetched filled fixed folded followed found gathered grabbed greeted guarded
held helped hid hugged joined kept kicked kissed knew landed lifted liked
lost loved made mended met missed moved noticed opened ordered packed painted
passed photographed picked planted played pulled pushed raised reached read
remembered repaired rescued returned rolled sang saved saw sent served shared
showed signed sold sorted spotted stole stopped studied tasted taught threw
tied touched towed traded trained treated visited waited walked warmed washed
watched welcomed wrapped wrote
""".split())

ADVERBS = tuple("""
again almost always anxiously bravely briefly calmly carefully cheerfully
clearly closely early easily eagerly finally gently gladly happily honestly
kindly lately loudly neatly nervously never often patiently politely proudly
quickly quietly rarely really slowly softly soon suddenly today tomorrow
together twice warmly yesterday
""".split())

PREPOSITIONS = ('across', 'after', 'along', 'around', 'before', 'behind',
                'below', 'beside', 'beyond', 'by', 'during', 'for', 'from',
                'in', 'inside', 'near', 'over', 'past', 'through', 'toward',
                'under', 'with', 'without')


def _pick(words: tuple[str, ...], rng: np.random.Generator) -> str:
  """One word chosen uniformly."""
  return words[rng.integers(len(words))]


def _noun_phrase(rng: np.random.Generator) -> list[str]:
  """Determiner, optional adjective, noun."""
  phrase = [_pick(DETERMINERS, rng)]
  if rng.random() < 0.6:
    phrase.append(_pick(ADJECTIVES, rng))
  phrase.append(_pick(NOUNS, rng))
  if phrase[0] == 'a' and phrase[1][0] in 'aeiou':
    phrase[0] = 'an'
  return phrase


def sentence(rng: np.random.Generator) -> list[str]:
  """One sentence as a list of words (5 to 13 words)."""
  words = _noun_phrase(rng) + [_pick(VERBS, rng)] + _noun_phrase(rng)
  if rng.random() < 0.5:
    words += [_pick(PREPOSITIONS, rng)] + _noun_phrase(rng)
  if rng.random() < 0.4:
    words.append(_pick(ADVERBS, rng))
  return words


def text_with_words(num_words: int, rng: np.random.Generator) -> str:
  """Sentences totalling at least `num_words` words, punctuated."""
  sentences, count = [], 0
  while count < num_words:
    words = sentence(rng)
    count += len(words)
    sentences.append(' '.join(words).capitalize() + '.')
  return ' '.join(sentences)


def vocabulary_size() -> int:
  """Number of distinct words in the embedded list."""
  return len(set(DETERMINERS + NOUNS + ADJECTIVES + VERBS + ADVERBS +
                 PREPOSITIONS))
