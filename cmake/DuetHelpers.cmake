# duet_library(NAME SOURCES ... DEPS ... PRIVATE_DEPS ...)
# One library target per module: public headers in include/, sources in src/.
function(duet_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
                                     PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(${name} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
endfunction()

# duet_test(NAME SOURCES ... DEPS ...): a Catch2 test binary, discovered by ctest.
# Tests run from the source tree root so that tests/data paths resolve.
function(duet_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES} ${PROJECT_SOURCE_DIR}/tests/catch_main.cc)
  target_link_libraries(${name} PRIVATE Catch2::Catch2 ${ARG_DEPS})
  target_compile_definitions(${name} PRIVATE DUET_SOURCE_DIR="${PROJECT_SOURCE_DIR}"
                                             DUET_BINARY_DIR="${PROJECT_BINARY_DIR}")
  catch_discover_tests(${name} WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
                       PROPERTIES LABELS "${ARG_LABELS}")
endfunction()
