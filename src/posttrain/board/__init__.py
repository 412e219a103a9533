"""`posttrain board`: a web page over run folders, live while runs write.

runs.py         discovery, status, summaries, rollouts and config diffs, read from the files runs write
app.py          the FastAPI routes (the page, /api/...) and the api key / path checks
chat_models.py  the chat panel's models, through the same generation path as `posttrain chat`
samples.py      an SFT run's trained-span preview (as `posttrain data preview` prints it)
static/         index.html + board.js + board.css, and uPlot (vendored from the npm package, MIT)
"""
