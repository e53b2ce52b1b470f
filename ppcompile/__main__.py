from ppcompile.cli import main

main(prog_name="ppcompile")
