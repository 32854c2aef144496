"""VSP spatial reasoning: a maze image and a full action plan -> what happens (A goal, B hole, C safe elsewhere)."""
