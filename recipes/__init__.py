"""The recipes shipped with nnopt, installed as package data of `nnopt.recipes` (`nnopt recipes` lists them)."""
