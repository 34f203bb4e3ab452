// libFuzzer's driver, for a target that has its own main (SwiftPM gives every
// executable one). Only a build with -sanitize=fuzzer links the definition.
#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerRunDriver(int *argc, char ***argv,
                        int (*test_one_input)(const uint8_t *data, size_t size));
