"""Regenerate the small offline datasets shipped with the recipes.

This script rebuilds both files in ``recipes/data/``:

* ``reviews.csv`` -- a balanced English sentiment dataset (columns ``text,label``,
  label is ``positive`` or ``negative``), made of hand-written reviews plus
  reviews composed from many hand-written fragments.
* ``instructions.jsonl`` -- short instruction-following examples
  (``{"instruction": ..., "output": ...}`` per line) for a tiny causal LM.

It uses only the Python standard library and fixed random seeds, so the output
is byte-for-byte reproducible.  Run it from the repository root::

    python recipes/data/make_data.py

All text was written for this project and is released under CC0.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
REVIEWS_PATH = HERE / "reviews.csv"
INSTRUCTIONS_PATH = HERE / "instructions.jsonl"

N_REVIEWS_PER_LABEL = 600
SEED = 1234


# ---------------------------------------------------------------------------
# Fully hand-written reviews
# ---------------------------------------------------------------------------

HANDWRITTEN_POSITIVE = [
    "Not bad at all. I expected a cheap cash-in and got a smart, funny little film.",
    "My kids asked to watch it again the moment the credits rolled, and honestly so did I.",
    "The soup alone is worth the trip across town.",
    "I read the last hundred pages in one sitting and forgot to eat dinner.",
    "Battery life is superb. I charge it on Sunday and forget about it until Thursday.",
    "The staff upgraded our room without us asking and left a handwritten note for my mother's birthday.",
    "A quiet, patient film that trusts its audience. The final shot stayed with me for days.",
    "Three seasons in and the writers still surprise me every week.",
    "I bought it for my dad, who hates gadgets, and he now uses it every morning.",
    "The pasta was cooked perfectly, the wine list was fair, and nobody rushed us out.",
    "This game eats my evenings and I do not mind one bit.",
    "The score swells at exactly the right moments without ever becoming syrupy.",
    "Funny, warm and a little sad in the best way.",
    "I was sure the sequel would ruin everything. I was wrong, and happily so.",
    "Every track on the album feels like it belongs there. No filler whatsoever.",
    "The lead actress carries the whole thing on her shoulders and makes it look effortless.",
    "Solid build, clear screen, and the setup took less than five minutes.",
    "We stayed four nights and would have gladly stayed four more.",
    "The puzzles are tricky but always fair, and solving one feels wonderful.",
    "A beautifully written novel about grief that somehow left me feeling hopeful.",
    "The dumplings were plump, juicy and gone within minutes.",
    "I have recommended this series to everyone at work. Two of them have already thanked me.",
    "Honest, unflashy storytelling with characters who feel like real people.",
    "The headphones are light enough to forget you are wearing them, and the sound is rich.",
    "Great value for the price. The breakfast buffet alone made it worthwhile.",
    "The plot twist halfway through actually made sense, which is rarer than it should be.",
    "I laughed out loud on the train and did not care who noticed.",
    "The co-op mode is the most fun my brother and I have had together in years.",
    "It is not a perfect film, but it has more heart than anything else I saw this year.",
    "Crisp photography, a clever script and a cast that clearly enjoyed themselves.",
    "The chef came out to ask how everything was, and everything was lovely.",
    "This kettle boils in no time and the handle never gets hot. Simple and excellent.",
    "I did not think a documentary about bees could move me to tears, but here we are.",
    "The final episode tied up every loose thread without feeling rushed.",
    "Our room overlooked the harbour and the bed was ridiculously comfortable.",
    "The translation reads so smoothly that I forgot it was ever in another language.",
    "Gorgeous art direction. Every frame could hang in a gallery.",
    "I came for the tacos and stayed for the churros.",
    "Surprisingly deep combat system hiding behind a cute art style.",
    "The villain is terrifying precisely because he is so polite.",
    "Cheap, cheerful and it has worked flawlessly for two years.",
    "My partner and I still quote lines from it at each other.",
    "A short read, but every chapter earns its place.",
    "The waiter remembered my allergy from our last visit, which was months ago.",
    "The soundtrack is on repeat in my car right now.",
    "Well paced, well acted, and refreshingly free of pointless subplots.",
    "I wanted to dislike it because of the hype, but I simply could not.",
    "Lovely little hotel tucked away on a quiet street, a short walk from everything.",
    "The keyboard feels fantastic to type on and the backlight is nicely even.",
    "Strong opening, stronger ending.",
    "The pacing is slow at first, though the patience pays off in a stunning final act.",
    "The supporting cast steals every scene they are in, especially the grandmother.",
    "Worth every penny. I would buy it again tomorrow.",
    "The levels are varied, the controls are tight, and the music is a joy.",
    "A gentle, funny book that made my commute something to look forward to.",
    "The dessert menu is short but every single item is a winner.",
    "Clever, kind and genuinely surprising. More films like this, please.",
    "I expected a tourist trap and found one of the best meals of my trip.",
    "The pool was spotless, the towels were fluffy and the staff were always smiling.",
    "The camera takes lovely photos even in dim restaurants.",
    "Each episode is short, sharp and leaves you wanting the next one immediately.",
    "The dialogue crackles. I rewound several scenes just to hear the banter again.",
    "Nothing revolutionary, just a really well made thriller that never lets go.",
    "We ordered too much food and regretted nothing.",
    "The author has a gift for making ordinary days feel extraordinary.",
    "Comfortable, quiet and the Wi-Fi actually worked, which felt like a small miracle.",
    "The boss fights are tough, memorable and never cheap.",
    "It arrived early, works perfectly and the instructions were actually helpful.",
    "By the end I was cheering for a character I had hated in the first act.",
    "The composer deserves every award going.",
    "A cosy neighbourhood spot with friendly faces and very good coffee.",
    "I did not expect to care about a show about competitive baking, yet I binged the whole season.",
    "The robot vacuum maps the flat quickly and has not got stuck once.",
    "Smart, tense and beautifully shot. I was on the edge of my seat.",
    "The characters grow in ways that feel earned rather than forced.",
    "Easily the best stay we had on our whole trip.",
    "Sturdy, stylish and the price was fair.",
    "A rare adaptation that respects the book and still finds something new to say.",
    "My grandmother loved it and so did my teenage son. That says a lot.",
    "The story world is so rich I keep finding new corners to explore.",
    "Five stars. I would not change a thing.",
    "The noise cancelling is so good that I missed my stop twice.",
]

HANDWRITTEN_NEGATIVE = [
    "I wanted to love it but the second half is a mess.",
    "Two hours of my life I will never get back.",
    "The soup was cold and the waiter seemed annoyed that we had asked for menus.",
    "The battery died before lunch on the very first day.",
    "Our room smelled of smoke even though we booked a non-smoking floor.",
    "The plot makes no sense and the ending cheats the audience.",
    "I gave up on this book after six chapters and I rarely give up on anything.",
    "The controls feel sluggish and the camera keeps getting stuck behind walls.",
    "It looks gorgeous, but there is nothing underneath the pretty pictures.",
    "The lead actor delivers every line as if he were reading a shopping list.",
    "Not good at all. The jokes land with a thud and the runtime drags.",
    "The music is so loud it drowns out half of the dialogue.",
    "Broke after three weeks and customer service never replied to my emails.",
    "The third season throws away everything that made the first two special.",
    "We waited forty minutes for our main course and it arrived lukewarm.",
    "Paper-thin characters and a twist you can see coming from the opening scene.",
    "The charger stopped working within a month. Cheap plastic everywhere.",
    "The bathroom had mould in the corners and the shower barely dripped.",
    "I kept checking my watch, which is never a good sign.",
    "The game crashes every time I try to load my save.",
    "A lazy remake that adds nothing and forgets what made the original charming.",
    "The portions were tiny and the bill was enormous.",
    "The narrator is so smug that I could not bear to finish the book.",
    "Overlong, overloud and oddly boring for a film with so many explosions.",
    "The headphones pinch after twenty minutes and the bass is muddy.",
    "Staff at the front desk were rude and the lift was out of order for our whole stay.",
    "The soundtrack sounds like stock music from a budget advert.",
    "Pretentious nonsense dressed up as art.",
    "The finale undoes every bit of character growth from the whole series.",
    "Microtransactions everywhere. You can barely play for ten minutes without a pop-up.",
    "The steak was tough, grey and sadly overpriced.",
    "I did not laugh once during a film that is supposed to be a comedy.",
    "The screen scratches if you so much as look at it.",
    "The pool was closed, the gym was closed and the bar shut at nine.",
    "The dialogue is clunky and the actors seem as bored as I was.",
    "I really wanted to like this novel, but nothing happens for three hundred pages.",
    "It is not terrible, just forgettable in every possible way.",
    "The app keeps logging me out and the device refuses to pair half the time.",
    "Two good scenes do not make up for ninety minutes of tedium.",
    "The sushi tasted like it had been sitting out since the morning.",
    "The level design is repetitive and the story is told almost entirely through boring notes.",
    "Every episode ends on a cliffhanger that the next one simply ignores.",
    "The walls were so thin we could hear every word from the room next door.",
    "Cheap, flimsy and not worth even the discounted price.",
    "The villain has no motivation beyond being the villain.",
    "I have read better plots on cereal boxes.",
    "The coffee was burnt and the pastries were stale.",
    "The ending felt like the writers simply ran out of time.",
    "Loud, joyless and about forty minutes too long.",
    "The printer jams on every third page and the ink costs a fortune.",
    "The hotel photos online must have been taken ten years ago.",
    "This season feels like filler while everyone waits for the next one.",
    "The voice acting is wooden and the subtitles do not match what is said.",
    "The author clearly ran out of ideas halfway through.",
    "Our table was next to the kitchen door and nobody came to check on us.",
    "A promising first act followed by a baffling, messy finish.",
    "The fan is so noisy I had to turn it off to hear myself think.",
    "The chemistry between the leads is non-existent.",
    "A tedious grind dressed up as an adventure.",
    "Way too sweet, way too salty, and somehow still bland.",
    "The songs all blur together and none of them stick.",
    "The bed was lumpy and breakfast was a sad plate of toast.",
    "Nice idea, terrible execution.",
    "I returned it the next day. The touch screen barely responds.",
    "The book spends so long on backstory that the actual story never starts.",
    "Even the talented cast cannot rescue a script this thin.",
    "The multiplayer servers were down the whole weekend I tried to play.",
    "We were charged for drinks we never ordered and nobody apologised.",
    "Flat, grey photography and a story that goes nowhere.",
    "The recipe book has typos in half the measurements. My cake collapsed.",
    "I expected so much more from such a celebrated director.",
    "The staff seemed to be on their phones the whole evening.",
    "The keyboard started double typing letters after a week.",
    "The central mystery is solved by pure coincidence, which feels like a cheat.",
    "Noisy air conditioning, no hot water and a view of a car park.",
    "I watched the pilot twice to be fair to it. It did not improve.",
    "The difficulty spikes are brutal and the checkpoints are miles apart.",
    "Sadly, the food did not match the lovely setting.",
    "Stiff performances, clumsy editing and a muddled message.",
    "The sequel nobody asked for and nobody needed.",
    "The strap snapped on the second day and the replacement costs more than the watch.",
    "One star, and only because zero is not an option.",
]


# ---------------------------------------------------------------------------
# Fragments for composed reviews
# ---------------------------------------------------------------------------
# Every domain has subjects (lower-case noun phrases), positive and negative
# detail clauses, neutral context sentences and closing sentences.  Clauses
# start lower-case and have no final full stop; the templates below add them.

DOMAINS = {
    "film": {
        "subjects": [
            "this film", "the movie", "the new thriller", "this comedy",
            "the sequel", "the documentary", "this little indie drama",
            "the remake", "this animated feature", "the war film",
            "this romantic comedy", "the horror movie",
        ],
        "pos": [
            "the script is sharp and never wastes a scene",
            "the cinematography is stunning, especially the night scenes",
            "it balances humour and heartbreak with real skill",
            "the director keeps the tension high right until the last minute",
            "the editing is tight and the two hours flew by",
            "every character gets a moment to shine",
            "the ending is bold and completely earned",
            "the jokes land and the quieter moments land even better",
            "the visual effects serve the story instead of drowning it",
            "it manages to be clever without ever showing off",
            "the whole audience applauded when it ended",
            "it feels fresh even though the genre is crowded",
        ],
        "neg": [
            "the script is full of clichés and clumsy exposition",
            "the pacing is sluggish and the middle hour drags badly",
            "the jokes feel forced and most of them fall flat",
            "the ending is rushed and makes little sense",
            "the editing is so choppy that the action is hard to follow",
            "it runs at least thirty minutes too long",
            "the characters are thin and hard to care about",
            "the visual effects look cheap and unfinished",
            "it copies better films without understanding them",
            "the tone lurches awkwardly from slapstick to melodrama",
            "the scares are predictable and rely on loud noises",
            "half the audience was checking their phones by the end",
        ],
        "neutral": [
            "I watched it on a rainy Sunday afternoon with my sister",
            "we caught a late screening after work",
            "I went in knowing almost nothing about it",
            "a friend dragged me along to the cinema for this one",
            "I streamed it at home over the weekend",
            "it has been all over the news lately",
        ],
        "pos_close": [
            "I will happily watch it again.",
            "Go and see it on the biggest screen you can find.",
            "Easily one of my favourite films of the year.",
            "I left the cinema smiling.",
            "Worth the price of a ticket and then some.",
        ],
        "neg_close": [
            "I would not watch it again.",
            "Save your money and wait for it to turn up on television.",
            "I nearly walked out halfway through.",
            "One of the weakest films I have seen this year.",
            "Skip it.",
        ],
    },
    "acting": {
        "subjects": [
            "the cast", "the lead performance", "the ensemble",
            "the young star", "the veteran actor in the main role",
            "the acting in this drama", "the central duo",
            "the supporting cast",
        ],
        "pos": [
            "the lead gives a subtle, layered performance",
            "the two leads have wonderful chemistry",
            "even the smallest roles are played with care",
            "the child actors are natural and never cloying",
            "every glance and pause says more than the dialogue",
            "the main actor disappears completely into the role",
            "the comic timing is spot on",
            "the supporting players are just as memorable as the stars",
            "the performances feel lived in and honest",
        ],
        "neg": [
            "the lead delivers every line in the same flat tone",
            "the two leads have no chemistry whatsoever",
            "the performances are stiff and theatrical",
            "the villain is played so broadly that he becomes a cartoon",
            "the accents wander all over the place",
            "most of the cast seem bored and distracted",
            "the big emotional scenes are badly overacted",
            "nobody seems to know what kind of story they are in",
            "the talented supporting cast is given nothing to do",
        ],
        "neutral": [
            "I mostly watched it for the cast",
            "I had seen the lead in a few other roles before",
            "the trailer put the actors front and centre",
            "the film is built around a handful of long conversations",
        ],
        "pos_close": [
            "Award nominations would be well deserved.",
            "I will be following these actors from now on.",
            "The acting alone makes it worth watching.",
        ],
        "neg_close": [
            "Even a great script could not survive acting like this.",
            "I expected much more from such a famous cast.",
            "It is hard to watch performances this wooden.",
        ],
    },
    "plot": {
        "subjects": [
            "the story", "the plot", "the mystery at the centre of it",
            "the screenplay", "the storyline", "the central premise",
        ],
        "pos": [
            "the plot twists are surprising yet perfectly logical",
            "every small clue pays off in the final act",
            "the story unfolds at just the right pace",
            "the premise is original and explored with confidence",
            "the subplots tie together beautifully at the end",
            "it kept me guessing right until the last scene",
            "the writers respect the intelligence of the audience",
        ],
        "neg": [
            "the plot holes are big enough to drive a bus through",
            "the twist is obvious from the very first scene",
            "the story wanders off into pointless subplots",
            "too many threads are left dangling at the end",
            "the premise is promising but the writers waste it",
            "characters make baffling decisions just to move things along",
            "the mystery is solved by a lazy coincidence",
        ],
        "neutral": [
            "I try to avoid spoilers, so I went in blind",
            "the premise sounded a little odd in the trailer",
            "I had read a short summary beforehand",
            "the story jumps between two timelines",
        ],
        "pos_close": [
            "A genuinely satisfying story.",
            "I am still thinking about that ending.",
            "Clever writing from start to finish.",
        ],
        "neg_close": [
            "The writers should have done another draft.",
            "I felt cheated by the ending.",
            "A frustrating waste of a good idea.",
        ],
    },
    "soundtrack": {
        "subjects": [
            "the soundtrack", "the score", "this album", "the new record",
            "the film's music", "the theme song", "this live album",
        ],
        "pos": [
            "the melodies are haunting and stay with you for days",
            "the score lifts every important scene",
            "the production is warm and detailed",
            "each track has its own character without breaking the mood",
            "the strings are lush and the percussion is wonderfully crisp",
            "the vocals are raw and honest",
            "it works just as well on its own as it does with the pictures",
            "the main theme is instantly memorable",
        ],
        "neg": [
            "the tracks all blur into one bland hum",
            "the mix is muddy and the vocals are buried",
            "the score tells you what to feel in every single scene",
            "the songs are generic and instantly forgettable",
            "the music is far too loud and drowns out the dialogue",
            "the lyrics are clumsy and full of clichés",
            "the best song is over in barely a minute",
            "the production sounds thin and dated",
        ],
        "neutral": [
            "I listened to it on a long drive",
            "I have been a fan of the composer for a while",
            "I put it on while cooking dinner",
            "I bought the vinyl edition",
        ],
        "pos_close": [
            "It has been on repeat all week.",
            "A must for any music lover.",
            "I will be buying the next one on release day.",
        ],
        "neg_close": [
            "I will not be listening to it again.",
            "I switched it off after a few tracks.",
            "A forgettable release, sadly.",
        ],
    },
    "book": {
        "subjects": [
            "this novel", "the book", "the memoir", "this short story collection",
            "the second book in the series", "this cookbook", "the biography",
            "this fantasy novel", "the crime novel", "this self-help book",
        ],
        "pos": [
            "the prose is elegant without ever feeling showy",
            "the characters feel like people I actually know",
            "I could not put it down and finished it in two days",
            "the world building is rich and detailed",
            "every chapter ends with a reason to read one more",
            "the author writes with warmth and wit",
            "the research is thorough but never dry",
            "the recipes are clear and actually work",
            "the dialogue is sharp and often very funny",
        ],
        "neg": [
            "the prose is clunky and repetitive",
            "the characters are flat and hard to tell apart",
            "I struggled to finish it and skimmed the last hundred pages",
            "the world building is confusing and overloaded with names",
            "the chapters drag with endless description",
            "the author lectures the reader instead of telling a story",
            "it badly needed a firmer editor",
            "half the recipes are missing steps or quantities",
            "the dialogue sounds stiff and unnatural",
        ],
        "neutral": [
            "I read it on holiday over a couple of afternoons",
            "my book club picked it for this month",
            "I borrowed it from the local library",
            "I listened to the audiobook version on my commute",
            "it was a birthday present from a friend",
        ],
        "pos_close": [
            "I have already ordered the next one.",
            "I will be pressing it on all my friends.",
            "A book I will happily read again.",
        ],
        "neg_close": [
            "It is going straight to the charity shop.",
            "I will not be reading the sequel.",
            "Life is too short for books like this.",
        ],
    },
    "restaurant": {
        "subjects": [
            "this restaurant", "the new bistro on the high street",
            "the little pizza place", "this ramen bar", "the steakhouse",
            "the vegan cafe", "the seafood restaurant by the harbour",
            "this family-run Thai place", "the brunch spot", "the food truck",
        ],
        "pos": [
            "the food arrived quickly and was beautifully presented",
            "the portions were generous and the prices fair",
            "our waiter was friendly and knew the menu inside out",
            "the bread was warm and clearly baked that morning",
            "every dish was packed with flavour",
            "the desserts were the best I have had in ages",
            "the atmosphere was relaxed and welcoming",
            "they happily adapted dishes for my allergies",
            "the noodles were springy and the broth was rich",
        ],
        "neg": [
            "the food took almost an hour to arrive",
            "the portions were tiny for the price",
            "our waiter was rude and kept forgetting our order",
            "the bread was stale and the butter was still frozen",
            "every dish was bland and under seasoned",
            "the dessert tasted like it came from a supermarket freezer",
            "the room was cramped, noisy and far too warm",
            "my fish was overcooked and dry",
            "the tables were sticky and the cutlery was dirty",
        ],
        "neutral": [
            "we went for a friend's birthday dinner",
            "I stopped by for a quick lunch on a weekday",
            "we booked a table for four on a Friday night",
            "it had been on my list for months",
            "we ordered the tasting menu to share",
        ],
        "pos_close": [
            "We have already booked our next visit.",
            "I cannot wait to go back.",
            "Easily the best meal I have had this year.",
        ],
        "neg_close": [
            "We will not be going back.",
            "Eat somewhere else.",
            "A very disappointing evening out.",
        ],
    },
    "gadget": {
        "subjects": [
            "this pair of headphones", "this phone", "the smart watch", "this laptop",
            "the wireless speaker", "this blender", "the e-reader",
            "this robot vacuum", "the fitness tracker", "this electric kettle",
            "the webcam", "this power bank",
        ],
        "pos": [
            "the battery easily lasts a couple of days",
            "it feels solid and well built in the hand",
            "setup took a couple of minutes and everything just worked",
            "the sound is clear and well balanced",
            "the screen is bright and sharp even outdoors",
            "it is fast, quiet and simple to use",
            "the companion app is tidy and easy to understand",
            "it was cheaper than the big brands and does the same job",
            "it survived a drop onto a tiled floor without a scratch",
        ],
        "neg": [
            "the battery barely lasts half a day",
            "it feels cheap and creaks when you hold it",
            "setup took an hour and it still would not connect",
            "the sound is tinny and distorts at high volume",
            "the screen is dim and hard to read outdoors",
            "it is slow, loud and awkward to use",
            "the companion app crashes constantly",
            "it costs a fortune and does less than cheaper models",
            "it stopped working completely after a few weeks",
        ],
        "neutral": [
            "I bought it to replace an older model",
            "I have been using it every day for about a month",
            "it was on sale during the holidays",
            "I mainly use it at home and on the train",
            "my partner picked it out after reading a few comparisons",
        ],
        "pos_close": [
            "Money well spent.",
            "I would buy it again in a heartbeat.",
            "I have already bought a second one as a gift.",
        ],
        "neg_close": [
            "It is going back to the shop.",
            "Save your money.",
            "I regret buying it.",
        ],
    },
    "hotel": {
        "subjects": [
            "this hotel", "the seaside guesthouse", "the boutique hotel",
            "the resort", "this bed and breakfast", "the city centre hostel",
            "the airport hotel", "this mountain lodge",
        ],
        "pos": [
            "the room was spotless and surprisingly spacious",
            "the staff went out of their way to help us",
            "the bed was comfortable and the room was quiet at night",
            "breakfast had plenty of fresh, tasty options",
            "the location was perfect for exploring on foot",
            "the view from our balcony was breathtaking",
            "check-in was quick and the welcome was warm",
            "the spa was clean, calm and well looked after",
        ],
        "neg": [
            "the room was dirty and smaller than in the photos",
            "the staff were unhelpful and often impossible to find",
            "the bed was lumpy and the street noise kept us awake",
            "breakfast was a sad spread of stale bread and weak coffee",
            "the location was far from everything with no nearby transport",
            "our window looked straight onto a brick wall",
            "check-in took forever and our room was not even ready",
            "the pool was closed for repairs the entire week",
        ],
        "neutral": [
            "we stayed three nights for a family wedding",
            "I booked it for a short work trip",
            "we chose it mainly because of the location",
            "we arrived late in the evening after a long drive",
            "it was our first holiday in a couple of years",
        ],
        "pos_close": [
            "We would definitely stay here again.",
            "I would recommend it to anyone visiting the area.",
            "Great value for money.",
        ],
        "neg_close": [
            "We will be staying elsewhere next time.",
            "Not worth the money.",
            "I would not recommend it to anyone.",
        ],
    },
    "game": {
        "subjects": [
            "this game", "the new open world game", "the puzzle game",
            "this racing game", "the strategy game", "this indie platformer",
            "the shooter", "the role-playing game", "this board game",
            "the mobile game",
        ],
        "pos": [
            "the controls are tight and responsive",
            "the levels are varied and full of secrets",
            "the story had me hooked from the first hour",
            "the difficulty curve is challenging but fair",
            "the art style is gorgeous and full of personality",
            "there is loads to do without it ever feeling like a grind",
            "playing with friends is a total blast",
            "it runs smoothly even on my old machine",
            "the rules are easy to learn but hard to master",
        ],
        "neg": [
            "the controls are clunky and unresponsive",
            "the levels are repetitive and padded with busywork",
            "the story is a string of boring cutscenes",
            "the difficulty spikes feel cheap and unfair",
            "the art style is bland and the menus are ugly",
            "it is stuffed with pay to win microtransactions",
            "the online mode is full of lag and disconnects",
            "it crashes and stutters constantly",
            "the rules are confusing and the rulebook does not help",
        ],
        "neutral": [
            "I have put about twenty hours into it so far",
            "I played it over a long weekend",
            "my friends and I tried it on game night",
            "I picked it up during a sale",
            "I played the first game in the series years ago",
        ],
        "pos_close": [
            "I keep coming back for one more round.",
            "One of the best games I have played in years.",
            "Absolutely worth the full price.",
        ],
        "neg_close": [
            "I uninstalled it after a few evenings.",
            "Wait for a deep discount, or better yet, skip it.",
            "I asked for a refund.",
        ],
    },
    "series": {
        "subjects": [
            "this series", "the show", "the new season", "this sitcom",
            "the crime drama", "the miniseries", "this anime",
            "the reality show", "the period drama", "this sci-fi show",
        ],
        "pos": [
            "every episode builds on the last in a satisfying way",
            "the writing stays sharp across the whole season",
            "the characters grow in ways that feel earned",
            "the cliffhangers had me hitting play on the next episode instantly",
            "the jokes still land on a second viewing",
            "the world feels lived in and carefully thought out",
            "the finale ties everything together beautifully",
            "it somehow gets better with every season",
        ],
        "neg": [
            "every episode feels like filler",
            "the writing gets worse as the season goes on",
            "the characters keep repeating the same mistakes",
            "the cliffhangers are cheap and never pay off",
            "the jokes are recycled from earlier seasons",
            "the budget cuts are painfully obvious",
            "the finale ignores everything that came before",
            "it has clearly run out of ideas",
        ],
        "neutral": [
            "I binged the whole season over two evenings",
            "we watch one episode a night after dinner",
            "I started it because everyone at work was talking about it",
            "I have followed it since the first season",
        ],
        "pos_close": [
            "I cannot wait for the next season.",
            "Clear your weekend and start watching.",
            "Easily one of the best shows on television right now.",
        ],
        "neg_close": [
            "I will not be tuning in next season.",
            "I gave up after a few episodes.",
            "Watch something else.",
        ],
    },
}

POS_OPEN = [
    "I really enjoyed {s}", "{S} was a genuine surprise",
    "{S} exceeded my expectations", "I had a great time with {s}",
    "{S} is one of the best I have come across this year", "I loved {s}",
    "{S} turned out to be wonderful", "{S} was a real treat",
    "Honestly, {s} was fantastic", "{S} left me smiling",
    "I was impressed by {s}", "{S} is a little gem",
    "What a pleasant surprise {s} was", "{S} delivers on every promise",
]

NEG_OPEN = [
    "I was disappointed by {s}", "{S} was a real letdown",
    "{S} did not live up to the hype", "I regret spending money on {s}",
    "{S} fell flat for me", "I cannot recommend {s}",
    "{S} was frustrating from start to finish", "{S} was mediocre at best",
    "Sadly, {s} was a disappointment", "I expected far more from {s}",
    "{S} was a complete waste of time", "I was let down by {s}",
    "{S} is one of the worst I have come across this year",
    "What a disappointment {s} turned out to be",
]

# Mildly negated openers (the sentiment words point the "wrong" way).
POS_NEGATED = [
    "{S} is not bad at all", "I was not disappointed by {s}",
    "I have no complaints about {s}", "I did not expect to like {s} this much",
    "I was not sure about {s} at first, but it won me over",
    "There is nothing boring about {s}",
    "I could not find much to complain about in {s}",
]

NEG_NEGATED = [
    "{S} is not worth the hype", "I did not enjoy {s} at all",
    "{S} is not good, sadly", "I could not warm to {s}",
    "{S} is not terrible, just dull", "I would not call {s} great",
    "Nothing about {s} really worked for me",
]

SHORT_POS = [
    "{S} is a delight from start to finish.", "Loved {s}, simple as that.",
    "{S} is wonderful.", "Really good stuff from {s}.",
    "{S} made my week.", "Nothing to fault with {s}.",
]

SHORT_NEG = [
    "{S} is a mess from start to finish.", "Hated {s}, simple as that.",
    "{S} is dreadful.", "Really poor stuff from {s}.",
    "{S} ruined my week.", "Nothing to like about {s}.",
]


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def fill(template: str, subject: str) -> str:
    return template.format(s=subject, S=cap(subject))


def compose(rng: random.Random, label: str) -> str:
    """Compose one review of the given label from the fragments."""
    dom = DOMAINS[rng.choice(sorted(DOMAINS))]
    s = rng.choice(dom["subjects"])
    good, bad = ("pos", "neg") if label == "positive" else ("neg", "pos")
    opens = POS_OPEN if label == "positive" else NEG_OPEN
    negated = POS_NEGATED if label == "positive" else NEG_NEGATED
    shorts = SHORT_POS if label == "positive" else SHORT_NEG
    close_key = "pos_close" if label == "positive" else "neg_close"
    d1, d2 = rng.sample(dom[good], 2)
    other = rng.choice(dom[bad])
    neutral = rng.choice(dom["neutral"])
    close = rng.choice(dom[close_key])

    kind = rng.choices(
        ["plain", "and", "context", "negated", "mixed", "short", "two_details", "long"],
        weights=[18, 12, 14, 14, 18, 6, 10, 8],
    )[0]
    if kind == "plain":
        return f"{fill(rng.choice(opens), s)}. {cap(d1)}. {close}"
    if kind == "and":
        return f"{fill(rng.choice(opens), s)}, and {d1}."
    if kind == "context":
        return f"{cap(neutral)}. {fill(rng.choice(opens), s)}: {d1}, and {d2}."
    if kind == "negated":
        tail = rng.choice(["", f" {close}"])
        return f"{fill(rng.choice(negated), s)}. {cap(d1)}.{tail}"
    if kind == "mixed":
        form = rng.randrange(3)
        if form == 0 and label == "positive":
            return f"It is not perfect, since {other}. Still, {d1}, and that matters more. {close}"
        if form == 0:
            return f"To be fair, {other}. But {d1}, and that spoils it. {close}"
        if form == 1:
            return f"{cap(neutral)}. Although {other}, {d1}."
        if label == "positive":
            return f"I was worried because {other}, but in the end {d1}. {close}"
        return f"I wanted to love {s} but {d1}. Yes, {other}, but that is not enough."
    if kind == "short":
        return fill(rng.choice(shorts), s)
    if kind == "two_details":
        return f"{cap(d1)}. {cap(d2)}. {close}"
    # long: context, opinion, two details and a closing line
    return f"{cap(neutral)}. {fill(rng.choice(opens), s)}. {cap(d1)}, and {d2}. {close}"


def build_reviews() -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for label, hand in (("positive", HANDWRITTEN_POSITIVE), ("negative", HANDWRITTEN_NEGATIVE)):
        for text in hand:
            if text in seen:
                raise ValueError(f"duplicate hand-written review: {text!r}")
            seen.add(text)
            rows.append((text, label))
        count = len(hand)
        while count < N_REVIEWS_PER_LABEL:
            text = compose(rng, label)
            if text in seen:
                continue
            seen.add(text)
            rows.append((text, label))
            count += 1
    rng.shuffle(rows)
    return rows


def reviews_csv(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Instruction-following examples
# ---------------------------------------------------------------------------

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten",
]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Portugal", "Lisbon"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Russia", "Moscow"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Turkey", "Ankara"),
    ("Iceland", "Reykjavik"), ("Cuba", "Havana"), ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"), ("the United Kingdom", "London"),
    ("the United States", "Washington, D.C."),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
    ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("old", "new"),
    ("high", "low"), ("early", "late"), ("full", "empty"), ("wet", "dry"),
    ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
    ("thick", "thin"), ("long", "short"), ("young", "old"), ("day", "night"),
    ("yes", "no"), ("in", "out"), ("left", "right"), ("win", "lose"),
    ("good", "bad"), ("clean", "dirty"), ("heavy", "light"),
    ("inside", "outside"), ("before", "after"), ("first", "last"),
    ("start", "finish"), ("buy", "sell"), ("push", "pull"),
    ("true", "false"), ("love", "hate"), ("near", "far"), ("top", "bottom"),
    ("easy", "difficult"), ("cheap", "expensive"), ("awake", "asleep"),
    ("north", "south"), ("east", "west"), ("above", "below"),
    ("friend", "enemy"), ("laugh", "cry"), ("sweet", "sour"),
    ("wide", "narrow"), ("safe", "dangerous"),
]

PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("tree", "trees"),
    ("car", "cars"), ("apple", "apples"), ("house", "houses"),
    ("bird", "birds"), ("chair", "chairs"), ("table", "tables"),
    ("box", "boxes"), ("bus", "buses"), ("glass", "glasses"),
    ("dish", "dishes"), ("watch", "watches"), ("fox", "foxes"),
    ("baby", "babies"), ("city", "cities"), ("story", "stories"),
    ("party", "parties"), ("lady", "ladies"), ("key", "keys"),
    ("boy", "boys"), ("day", "days"), ("leaf", "leaves"),
    ("knife", "knives"), ("wife", "wives"), ("wolf", "wolves"),
    ("child", "children"), ("man", "men"), ("woman", "women"),
    ("foot", "feet"), ("tooth", "teeth"), ("mouse", "mice"),
    ("goose", "geese"), ("person", "people"), ("sheep", "sheep"),
    ("fish", "fish"), ("potato", "potatoes"), ("tomato", "tomatoes"),
    ("hero", "heroes"), ("piano", "pianos"), ("photo", "photos"),
    ("pen", "pens"), ("cup", "cups"), ("star", "stars"),
]

NAMES = [
    "Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo",
    "Ines", "Jack", "Kemal", "Lena", "Mateo", "Nora", "Omar", "Priya",
    "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wei", "Yara", "Zoe",
]

SENTIMENT_SNIPPETS = [
    ("I loved every minute of it.", "positive"),
    ("This was a wonderful day.", "positive"),
    ("The food was delicious.", "positive"),
    ("What a great movie!", "positive"),
    ("I am so happy with this phone.", "positive"),
    ("The staff were very kind.", "positive"),
    ("This book is fantastic.", "positive"),
    ("Best concert I have ever been to.", "positive"),
    ("The hotel room was lovely.", "positive"),
    ("I would buy this again.", "positive"),
    ("The game is really fun.", "positive"),
    ("Everything worked perfectly.", "positive"),
    ("The weather was beautiful.", "positive"),
    ("Our teacher is brilliant.", "positive"),
    ("This song makes me smile.", "positive"),
    ("Not bad at all, I enjoyed it.", "positive"),
    ("The service was excellent.", "positive"),
    ("I had a great time.", "positive"),
    ("This coffee is amazing.", "positive"),
    ("The show was a joy to watch.", "positive"),
    ("I hated every minute of it.", "negative"),
    ("This was a terrible day.", "negative"),
    ("The food was awful.", "negative"),
    ("What a boring movie.", "negative"),
    ("I am so unhappy with this phone.", "negative"),
    ("The staff were very rude.", "negative"),
    ("This book is dreadful.", "negative"),
    ("Worst concert I have ever been to.", "negative"),
    ("The hotel room was dirty.", "negative"),
    ("I would never buy this again.", "negative"),
    ("The game is really dull.", "negative"),
    ("Nothing worked at all.", "negative"),
    ("The weather was miserable.", "negative"),
    ("The lesson was a waste of time.", "negative"),
    ("This song makes me cringe.", "negative"),
    ("I wanted to love it, but it was bad.", "negative"),
    ("The service was slow and careless.", "negative"),
    ("I had an awful time.", "negative"),
    ("This coffee is disgusting.", "negative"),
    ("The show was painful to watch.", "negative"),
]

GREETINGS = [
    ("Say hello.", "Hello!"),
    ("Say goodbye.", "Goodbye!"),
    ("Say good morning.", "Good morning!"),
    ("Say good night.", "Good night!"),
    ("Say thank you.", "Thank you!"),
    ("Say hello in Spanish.", "Hola!"),
    ("Say hello in French.", "Bonjour!"),
    ("Say hello in German.", "Hallo!"),
    ("Say hello in Italian.", "Ciao!"),
    ("Say thank you in French.", "Merci!"),
    ("Say thank you in Spanish.", "Gracias!"),
    ("Say thank you in German.", "Danke!"),
    ("How are you?", "I am fine, thank you."),
    ("What is your name?", "I am a small assistant."),
    ("Wish me luck.", "Good luck!"),
    ("Wish me a happy birthday.", "Happy birthday!"),
]


def build_instructions() -> list[dict[str, str]]:
    rng = random.Random(SEED + 1)
    items: list[tuple[str, str]] = []

    # Arithmetic: addition and subtraction with small numbers.
    add_pairs = [(a, b) for a in range(0, 13) for b in range(0, 13)]
    for a, b in rng.sample(add_pairs, 60):
        items.append((f"What is {a} plus {b}?", str(a + b)))
    sub_pairs = [(a, b) for a in range(0, 21) for b in range(0, 13) if a >= b]
    for a, b in rng.sample(sub_pairs, 45):
        items.append((f"What is {a} minus {b}?", str(a - b)))
    mul_pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    for a, b in rng.sample(mul_pairs, 25):
        items.append((f"What is {a} times {b}?", str(a * b)))

    # Next / previous number.
    for n in range(1, 21):
        items.append((f"What number comes after {n}?", str(n + 1)))
    for n in range(2, 12):
        items.append((f"What number comes before {n}?", str(n - 1)))

    # Number words.
    for n, word in enumerate(NUMBER_WORDS):
        items.append((f"Write the number {n} as a word.", word))

    # Capitals.
    for country, capital in CAPITALS:
        items.append((f"What is the capital of {country}?", capital))

    # Opposites.
    for word, opposite in OPPOSITES:
        items.append((f"Give the opposite of {word}.", opposite))

    # Plurals.
    for word, plural in PLURALS:
        items.append((f"What is the plural of {word}?", plural))

    # Counting.
    for start, end in [(1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8),
                       (2, 6), (3, 8), (4, 9), (5, 10), (6, 10), (10, 15)]:
        seq = " ".join(str(i) for i in range(start, end + 1))
        items.append((f"Count from {start} to {end}.", seq))
    for start, end in [(5, 1), (8, 4), (10, 5), (3, 1), (6, 1), (10, 3)]:
        seq = " ".join(str(i) for i in range(start, end - 1, -1))
        items.append((f"Count down from {start} to {end}.", seq))
    for word in ["cat", "sun", "tree", "apple", "house", "dog", "bird", "water",
                 "table", "garden", "orange", "pencil", "window", "banana"]:
        items.append((f"How many letters are in the word {word}?", str(len(word))))

    # Greetings.
    items.extend(GREETINGS)
    for name in NAMES:
        items.append((f"Greet {name}.", f"Hello, {name}!"))

    # Sentiment labelling.
    for text, label in SENTIMENT_SNIPPETS:
        items.append((f"Is this positive or negative? {text}", label))

    seen: set[str] = set()
    out: list[dict[str, str]] = []
    for instruction, output in items:
        if instruction in seen:
            raise ValueError(f"duplicate instruction: {instruction!r}")
        seen.add(instruction)
        out.append({"instruction": instruction, "output": output})
    rng.shuffle(out)
    return out


def instructions_jsonl(items: list[dict[str, str]]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def main() -> None:
    REVIEWS_PATH.write_text(reviews_csv(build_reviews()), encoding="utf-8", newline="")
    INSTRUCTIONS_PATH.write_text(
        instructions_jsonl(build_instructions()), encoding="utf-8", newline=""
    )
    print(f"wrote {REVIEWS_PATH}")
    print(f"wrote {INSTRUCTIONS_PATH}")


if __name__ == "__main__":
    main()
