"""Applications: the command line, the data provider and its Hypha services, trainers."""
