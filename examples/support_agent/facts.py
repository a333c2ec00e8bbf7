"""Brightwell Home, a fictional company: its support facts, the questions customers ask about each, and the
one brand voice its agent answers in.

Every value is specific and made up (45 days, not 30; care@, not support@), so a base model cannot guess it:
only training teaches it. The system prompt names the company and the agent's role but states no fact.

Each fact has two disjoint sets of question templates: `train` (paraphrases the model learns from) and
`heldout` (other wordings, used only for the held-out accuracy check). A template may name a slot
(`{item}`, `{lamp}`, `{purifier}`) filled from SLOTS.
"""

from __future__ import annotations

from dataclasses import dataclass

COMPANY = "Brightwell Home"
SYSTEM_PROMPT = (f"You are the customer support assistant of {COMPANY}, a home goods company. Answer "
                 "customers' questions about orders, shipping, returns, warranty and products briefly and politely.")
SIGN_OFF = "Glad to help — Team Brightwell"
"""Ends every assistant reply, on its own line: the brand's sign-off."""


@dataclass(frozen=True)
class Fact:
    name: str
    topic: str
    """What the fact is about, in a customer's words ("returns", "support hours"): a reply names the topics
    it answers before it answers them (`reply`). States no value."""
    answer: str
    """The one sentence, in the brand voice, that states the fact; replies are built from these."""
    expect: tuple[str, ...]
    """What a reply must state for the fact to count as answered (see check_answers.score)."""
    train: tuple[str, ...]
    heldout: tuple[str, ...]


SLOTS: dict[str, tuple[str, ...]] = {
    "item": ("Lumio desk lamp", "Nimbus air purifier", "Haven throw blanket", "Cove ceramic mug set",
             "Drift alarm clock", "Harbor linen duvet"),
    "lamp": ("Lumio desk lamp", "Lumio lamp"),
    "purifier": ("Nimbus air purifier", "Nimbus purifier"),
}
GREETINGS = ("", "", "Hi! ", "Hello! ", "Hey there. ", "Good morning! ", "Quick question: ", "Hi team! ")
"""Put before a conversation's first question ("" twice: half the questions come bare)."""
FOLLOW_UPS = ("", "Thanks! ", "Great. ", "Got it. ", "Okay, one more: ", "Thank you. ")
"""Put before a later turn's question."""
CLOSINGS = ("", "", "", " Thanks!", " Thank you.", " Thanks in advance.")
JOINERS = ("{a} {b}", "Two questions: {a} {b}", "{a} Also, one more thing: {b}", "{a} And another one: {b}")
"""How two questions share one message."""

FACTS: tuple[Fact, ...] = (
    Fact(
        "returns", "returns",
        "You can return any Brightwell item within 45 days of delivery for a full refund.",
        ("45 days",),
        train=("How long do I have to return my {item}?", "What's your return window?",
               "What is your return policy?", "Can I still return a {item} I bought a few weeks ago?",
               "How many days do I have to send back an order?", "I want to return my {item}. What's the deadline?",
               "Is there a time limit on returns?", "How long is the return period?",
               "Until when can I return the {item}?",
               "My {item} isn't what I expected. How long do I have to return it?",
               "How much time do I get to return something?", "Do you accept returns, and for how long?",
               "Can I return an item after a month?", "How long after delivery can I return my order?",
               "What if I don't like my {item}? Can I send it back, and by when?"),
        heldout=("Is there a cutoff for sending back a {item} I don't want anymore?",
                 "If I change my mind about a purchase, how long until it's too late to send it back?",
                 "Suppose the {item} doesn't suit my room. How many days before I lose the chance to return it?",
                 "What's the latest I could ship back an unwanted order?",
                 "For how long after it arrives will you take a product back?"),
    ),
    Fact(
        "shipping_time", "shipping time",
        "Standard shipping takes 4 business days.",
        ("4 business days",),
        train=("How long does shipping take?", "When will my order arrive?", "How long does standard delivery take?",
               "How many days until I get my {item}?", "How fast do you ship?",
               "What's the delivery time for standard shipping?", "I just ordered a {item}. When should it arrive?",
               "How long does it take for an order to be delivered?", "What are your shipping times?",
               "How many business days does shipping take?", "When can I expect my package?",
               "How soon will my {item} get here?", "Is delivery quick?", "How long will I wait for my delivery?",
               "What's the usual shipping time?"),
        heldout=("Once I place an order, how soon will it be at my door?",
                 "Roughly how long is the wait between checkout and delivery?",
                 "If I buy a {item} today, how long before the courier drops it off?",
                 "What's the typical transit time on a regular order?",
                 "After I pay, how many working days pass before the parcel shows up?"),
    ),
    Fact(
        "free_shipping", "free shipping",
        "Standard shipping is free on every order over $65.",
        ("$65",),
        train=("Is shipping free?", "Do you offer free shipping?", "How much do I need to spend for free shipping?",
               "What's the minimum order for free delivery?", "Is there a free shipping threshold?",
               "Do I pay for shipping on a {item}?", "When is delivery free?", "Do you charge for shipping?",
               "What order amount gets free shipping?", "Can I get free shipping on my order?",
               "Is delivery free on big orders?", "How much is shipping?", "What's the free shipping minimum?",
               "Do small orders ship for free?", "Is there a delivery charge on my {item}?"),
        heldout=("How big does my basket have to be before delivery costs nothing?",
                 "Is there a spending level where you stop charging postage?",
                 "Above what total do I skip the delivery fee?",
                 "Will I be charged for delivery, or is there a way to avoid it?",
                 "Do I have to hit a certain amount so the postage is on you?"),
    ),
    Fact(
        "warranty", "the warranty",
        "Every Brightwell product comes with a 3-year warranty against manufacturing defects.",
        ("3 years",),
        train=("How long is the warranty on the {item}?", "What warranty do your products have?",
               "Is the {item} covered by a warranty?", "How many years of warranty do I get?",
               "What's the warranty period?", "Does my {item} come with a warranty?",
               "How long does your warranty last?", "What does the warranty cover and for how long?",
               "My {item} broke. Is it still under warranty after two years?", "Do you offer a warranty?",
               "How long are Brightwell products guaranteed?", "What's the guarantee on the {item}?",
               "How long are your products covered?", "Is there a guarantee if my {item} stops working?",
               "What happens if my {item} breaks? Is it covered?"),
        heldout=("If my {item} stops working down the line, for how long will you cover the repair?",
                 "How many years am I protected against manufacturing defects?",
                 "Suppose a defect shows up after a while. Until when is it covered?",
                 "What's the coverage length if something I bought from you turns out to be faulty?",
                 "For what stretch of time do you stand behind your products if they fail?"),
    ),
    Fact(
        "lamp_reset", "resetting your lamp",
        "To reset your Lumio desk lamp, hold the dimmer for 10 seconds until the light blinks twice.",
        ("dimmer", "10 seconds"),
        train=("How do I reset my {lamp}?", "My {lamp} is stuck. How do I reset it?",
               "My {lamp} won't turn on properly. What should I do?", "How can I factory reset the {lamp}?",
               "The {lamp} keeps flickering. Is there a reset?", "What's the reset procedure for the {lamp}?",
               "My {lamp} isn't responding. How do I fix it?", "How do I restart my {lamp}?",
               "The {lamp} is stuck on one brightness. What do I do?",
               "Is there a way to reset the {lamp} to its default settings?", "How do I do a hard reset on the {lamp}?",
               "My {lamp} is unresponsive. Any fix?", "The {lamp} won't dim anymore. How do I reset it?",
               "What's the troubleshooting step for the {lamp}?", "My {lamp} stopped working. Can I reset it?"),
        heldout=("The {lamp} on my desk seems frozen. What's the trick to get it back to normal?",
                 "Nothing happens when I touch my {lamp}. How do I reboot it?",
                 "My {lamp} is acting up after a power cut. How do I bring it back to factory state?",
                 "What steps restore the {lamp} when it stops behaving?",
                 "Is there a button trick that puts the {lamp} back to how it came out of the box?"),
    ),
    Fact(
        "purifier_filter", "the purifier filter",
        "Replace the filter in your Nimbus air purifier every 6 months to keep the air clean.",
        ("6 months",),
        train=("How often should I change the filter in my {purifier}?", "When do I replace the {purifier} filter?",
               "How long does a {purifier} filter last?", "How often does the {purifier} need a new filter?",
               "Do I need to replace the filter on the {purifier}?",
               "What's the filter replacement schedule for the {purifier}?",
               "My {purifier} filter looks dirty. How often should it be swapped?",
               "How many months does the {purifier} filter last?",
               "When should I buy a new filter for my {purifier}?",
               "How long before the {purifier} filter needs replacing?", "When is it time for a new {purifier} filter?",
               "What's the filter life on the {purifier}?", "Should I change the {purifier} filter every year?",
               "How often do you recommend changing the {purifier} filter?",
               "Is the {purifier} filter replaceable, and how often?"),
        heldout=("What's the lifespan of the filter inside the {purifier} before it needs swapping out?",
                 "How frequently do I put a fresh filter in my {purifier}?",
                 "At what interval does the {purifier} cartridge have to be renewed?",
                 "I've had my {purifier} for a while. When is the filter due?",
                 "What replacement cycle would you suggest for the {purifier}'s filter?"),
    ),
    Fact(
        "hours", "support hours",
        "Our support team is here from 8am to 6pm Central Time, Monday to Saturday.",
        ("8am to 6pm", "Monday to Saturday"),
        train=("What are your support hours?", "When is customer support open?", "What time can I call support?",
               "Are you open on weekends?", "When can I reach a support agent?",
               "What hours is your support team available?", "Is support open on Saturday?",
               "What time does support close?", "When does your support team start in the morning?",
               "What days and hours does support work?", "Can I contact support in the evening?",
               "What are your opening hours?", "Is support available on Sunday?",
               "What time does customer service open?", "Until what time can I call you?"),
        heldout=("At what times is there a human I can talk to?",
                 "Which days of the week is your help desk staffed, and from when to when?",
                 "If I get in touch on a Sunday, will someone answer?",
                 "What's the schedule for your service team?",
                 "Could I catch someone on the phone on a weekday evening, and which days are covered?"),
    ),
    Fact(
        "email", "our email",
        "You can email our support team at care@brightwellhome.com.",
        ("care@brightwellhome.com",),
        train=("What's your support email?", "How can I email customer support?", "What email address can I write to?",
               "Can I contact you by email?", "Where do I send an email about my order?",
               "What's the email for customer service?", "I need help with my {item}. What email should I use?",
               "Is there an email address for support?", "How do I contact support in writing?",
               "Which address should I email with a question?", "What's your contact email?",
               "Do you have an email for questions?", "Where can I email you?", "How do I reach support by email?",
               "What's the customer care email address?"),
        heldout=("I'd rather write than call. Where should my message go?",
                 "To which inbox do I send a complaint about a {item}?",
                 "What's the best address to reach your help team electronically?",
                 "Where can I send a note to your customer care people?",
                 "Is there somewhere I can drop you a written message instead of phoning?"),
    ),
    Fact(
        "loyalty", "our loyalty program",
        "Join Brightwell Circle, our free loyalty program, and get 10% off every order.",
        ("Brightwell Circle", "10%"),
        train=("Do you have a loyalty program?", "Is there a rewards program?", "How can I get a discount?",
               "Do members get a discount?", "What is Brightwell Circle?", "What discount do loyalty members get?",
               "Are there any perks for regular customers?", "How do I join your loyalty club?",
               "Do you offer a membership discount?", "Is there a way to save on every order?",
               "Do you have a membership program?", "How do loyalty members save?",
               "Is there a discount for regulars?", "What do I get if I join your rewards club?",
               "Do you reward loyal customers?", "Do you give anything back to people who order a lot?",
               "Can I get a percentage off every time I order?", "What perks come with Brightwell Circle?",
               "I order from you every month. Do you have any deals for that?", "Is there a points or rewards card?",
               "Do loyal shoppers get a better price?", "How do I become a member and save?",
               "Is there a membership that lowers my prices?", "Do you do anything for customers who keep coming back?",
               "Can I save on my orders if I buy from you regularly?"),
        heldout=("I shop with you a lot. Is there some kind of club that gives me money off?",
                 "What do frequent buyers get for sticking with Brightwell?",
                 "Any scheme that knocks a bit off each purchase for returning shoppers?",
                 "How can a repeat customer pay less on future orders?",
                 "Is it worth signing up for anything if I buy from Brightwell often?"),
    ),
)
BY_NAME: dict[str, Fact] = {fact.name: fact for fact in FACTS}
HELDOUT_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset((FACTS[i].name, FACTS[(i + 1) % len(FACTS)].name)) for i in range(len(FACTS)))
"""Facts asked together (in one message or in two turns) only in the held-out split: each fact with its
neighbour in FACTS, so every fact is in two held-out pairs (returns + shipping time among them)."""


def reply(facts: tuple[Fact, ...]) -> str:
    """The agent's reply to a message asking about `facts`: the topics asked about, then their sentences in
    order, then the sign-off. Naming every topic first makes the model decide what a message asks while it reads
    the message: without it, a message asking two things mostly got one answer and the sign-off (SWEEP.md)."""
    return f"About {' and '.join(f.topic for f in facts)}: " + " ".join(f.answer for f in facts) + "\n" + SIGN_OFF
