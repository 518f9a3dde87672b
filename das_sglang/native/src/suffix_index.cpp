#include "suffix_index.h"
