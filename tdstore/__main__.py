from tdstore.entry import run

run()
