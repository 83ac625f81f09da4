"""The method: schedule, boundary condition, teacher solver, SL-ODE, student, SPLAD loss, samplers, error bound, metrics. Imports no app, trainer or tool code."""
