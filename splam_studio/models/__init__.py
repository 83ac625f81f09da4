"""Loading teachers and students, LDM and kohya export, named model sets."""
